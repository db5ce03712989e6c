"""The run's record (``gpu_check.json``), its table (``gpu_check.md``) and each check's own record.

Torch-free, so the parent can merge and print records without importing torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SCHEMA = "pixpro-gpu-check/2"  # 2: checks "syncbn" and "job" replace "dist" and "resume"
STATUSES = ("pass", "fail", "not applicable", "timeout", "error")
RECORD = "gpu_check.json"
TABLE = "gpu_check.md"
FIELDS = ("name", "title", "status", "reason", "summary", "numbers", "seconds", "budget_s")
UNFINISHED = "did not finish"  # a check's reason until it writes its verdict


def empty_result(name: str, title: str, status: str, reason: str, budget_s: float = 0.0) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "status": status,
        "reason": reason,
        "summary": "",
        "numbers": {},
        "seconds": 0.0,
        "budget_s": budget_s,
    }


def previous_record(path: Path, mode: str) -> dict[str, Any]:
    """The record an ``--only`` rerun merges into: same schema and mode, else none."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return {}
    return record if record.get("schema") == SCHEMA and record.get("mode") == mode else {}


def markdown(record: dict[str, Any]) -> str:
    """The table that goes into benches/RESULTS.md after a run."""
    env: dict[str, Any] = next((c["numbers"] for c in record["checks"] if c["name"] == "env"), {})
    device = (
        env.get("gpu_name", "CPU") if record["mode"] == "gpu" else f"CPU ({env.get('cpu_count', '?')} cores)"
    )
    lines = [
        f"`benches/gpu_check.py` ({record['mode']} mode{', quick' if record['quick'] else ''}), "
        f"{record['started']}, {device}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
        f"cuDNN {env.get('cudnn', '-')}, NCCL {env.get('nccl', '-')}; "
        f"{record['seconds']:.0f} s in all (budget {record['total_budget_s']:.0f} s)",
        "",
        "| check | status | result | s |",
        "|---|---|---|---|",
    ]
    for c in record["checks"]:
        text = c["summary"] or ""
        if c["reason"]:
            text = f"{text}; {c['reason']}" if text else c["reason"]
        text = text.replace("|", "/").replace("\n", " ")
        lines.append(f"| {c['title']} | {c['status']} | {text} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):  # a tensor or an array
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


class Rec:
    """One check's record, written by the check's own process; ``save`` after each phase so a kill
    loses only the phase in flight."""

    def __init__(self, path: Path, name: str, title: str, budget: float) -> None:
        self.path = path
        self.data = empty_result(name, title, "error", UNFINISHED, budget)
        self.numbers: dict[str, Any] = self.data["numbers"]
        self.t0 = time.monotonic()

    def set(self, **numbers: Any) -> None:
        self.numbers.update(numbers)
        self.save()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.save()

    def finish(self, status: str, reason: str = "") -> None:
        self.data["status"], self.data["reason"] = status, reason
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable))
        tmp.replace(self.path)
