"""``pixpro status`` as a rich table (people) or JSON (scripts)."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.table import Table
from rich.text import Text

_STYLE = {
    "COMPLETED": "green",
    "RUNNING": "cyan",
    "STALLED": "bold red",  # running, but no rank progressed for longer than the hang timeout
    "PENDING": "yellow",
    "REQUEUED": "yellow",
    "PREEMPTED": "magenta",
    "NODE_FAIL": "yellow",  # requeued after a node failure: the run goes on
    "TIMEOUT": "magenta",
    "FAILED": "red",
    "CANCELLED": "dim",
    "UNKNOWN": "dim",
}


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _of(value: Any, total: Any) -> str:
    if value is None:
        return "-"
    return f"{value}/{total}" if total is not None else str(value)


def eta(row: dict[str, Any]) -> str:
    """A running run's time to finish; a pending one's expected start (local time), when SLURM has one."""
    if row.get("eta_s") is not None:
        return age(row["eta_s"])
    start = row.get("expected_start")
    return "-" if start is None else "starts " + time.strftime("%m-%d %H:%M", time.localtime(start))


def _knn(top1: Any, step: Any) -> str:
    """The kNN monitor's newest top-1 and the step it was measured at: ``41.2% @8000``."""
    return "-" if top1 is None else f"{100 * top1:.1f}% @{step}"


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title=None, header_style="bold", expand=False, pad_edge=False)
    for name, justify in (
        ("RUN", "left"), ("ATTEMPTS", "left"), ("STATE", "left"), ("NODES×GPUS", "right"),
        ("STEP", "right"), ("EPOCH", "right"), ("CKPT", "right"), ("CKPT AGE", "right"), ("COMMIT", "right"),
        ("LR", "right"), ("EMA", "right"), ("IMG/S", "right"), ("KNN@1", "right"), ("ETA", "right"),
    ):  # fmt: skip
        t.add_column(name, justify="right" if justify == "right" else "left", no_wrap=name != "STATE")
    for r in rows:
        state = Text(r["state"], style=_STYLE.get(r["state"], ""))
        if r["reason"]:
            state.append(f" ({r['reason']})", style="dim")
        t.add_row(
            r["run_id"],
            ",".join(a["job_id"] for a in r["attempts"]) or "-",
            state,
            f"{r['nodes']}×{r['gpus_per_node']}",
            _of(r["step"], r["total_steps"]),
            _num(r["epoch"], "d"),
            _num(r["checkpoint_step"], "d"),
            age(r["checkpoint_age_s"]),
            "-" if r.get("commit_s") is None else f"{r['commit_s']:.1f}s",
            _num(r["lr"], ".3g"),
            _num(r["ema_momentum"], ".5f"),
            _num(r["img_per_s"], ".1f"),
            _knn(r.get("knn_top1"), r.get("knn_step")),
            eta(r),
        )
    return t


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
