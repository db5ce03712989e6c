"""Sweeps: a grid of ``--sweep KEY=V1,V2`` values, each member a full run, queued as one SLURM array.

Every member is planned (spec, cluster, preflight) before anything is written, and every problem of
every member is reported at once. On SLURM the members share one sbatch script (an array has one), so
their resources must agree; each member keeps its own run folder, record, checkpoints and attempts.
The sweep record (``$PIXPRO_HOME/sweeps/<id>/sweep.json``) lists the members and their values.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import NotFound, PixproError, UsageError
from cluster.home import new_run_id, pixpro_home
from cluster.record import atomic_write
from schemas.contract import one_line

SWEEP_FILE = "sweep.json"


def sweeps_dir(home: Path | None = None) -> Path:
    return (home or pixpro_home()) / "sweeps"


def parse_grid(sweeps: Sequence[str]) -> list[dict[str, str]]:
    """``KEY=V1,V2`` options -> every combination, first option slowest: [{key: value text}].

    Values are split on the commas outside JSON brackets, braces and strings (``[0.2,1.0],[0.3,1.0]``
    is two values), and two values that ``--set`` would read as the same one (``2.0`` and ``2``) are
    refused: they would be two members that are the same job."""
    from schemas.spec.parse import override_value  # here: pixpro status reads sweeps, not specs

    axes: list[tuple[str, list[str]]] = []
    for item in sweeps:
        key, eq, values = item.partition("=")
        key = key.strip()
        texts = split_values(values)
        if not eq or not key or texts is None or not all(texts):
            raise UsageError(
                f"--sweep {one_line(item, 80)}: expected KEY.PATH=V1,V2,... e.g. optim.base_lr=2,4"
                + (" (unbalanced brackets or quotes)" if eq and key and texts is None else "")
            )
        if any(k == key for k, _ in axes):
            raise UsageError(f"--sweep {key}: given twice (list every value in one --sweep)")
        seen: dict[Any, int] = {}
        for i, text in enumerate(texts):
            j = seen.setdefault(_identity(override_value(text)), i)
            if j != i:
                shown = " and ".join(dict.fromkeys(one_line(t, 40) for t in (texts[j], text)))
                raise UsageError(f"--sweep {key}: {shown}: a value is listed twice (two members, one job)")
        axes.append((key, texts))
    if not axes:
        raise UsageError("--sweep: no values")
    return [
        dict(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*(v for _, v in axes))
    ]


def split_values(text: str) -> list[str] | None:
    """``V1,V2,...`` split on the commas outside ``[]``, ``{}`` and double-quoted strings, each value
    stripped; None when a bracket, brace or string is left open."""
    out: list[str] = []
    depth, in_string, escaped, start = 0, False, False, 0
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            if depth == 0:
                return None
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    if depth or in_string:
        return None
    return [*out, text[start:].strip()]


def _identity(value: Any) -> Any:
    """A hashable identity under which equal JSON values meet (``2``, ``2.0`` and ``2e0``), while
    ``true`` stays apart from ``1`` and a string from a number."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, int | float):  # 2 == 2.0 with equal hashes; NaN never equals itself
        return ("number", value if math.isfinite(value) else repr(value))
    if isinstance(value, list):
        return ("list", tuple(_identity(v) for v in value))
    if isinstance(value, dict):
        return ("object", tuple(sorted((k, _identity(v)) for k, v in value.items())))
    return (type(value).__name__, repr(value))


def member_label(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def member_overrides(values: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def collect_problems(values: dict[str, str], exc: BaseException) -> list[str]:
    """The lines of a member's refusal, each naming the member's values."""
    lines = getattr(exc, "problems", None) or getattr(exc, "lines", None) or [str(exc)]
    out = []
    for line in lines:
        for key in values:
            line = line.replace(f"(from --set {key})", f"(from --sweep {key})")
        out.append(f"sweep member {member_label(values)}: {line}")
    return out


def is_refusal(exc: BaseException) -> bool:
    import sys

    spec_error = getattr(sys.modules.get("schemas.spec.errors"), "SpecError", None)
    return isinstance(exc, PixproError) or (spec_error is not None and isinstance(exc, spec_error))


def problems_exit(problems: list[str]) -> PixproError:
    """Spec and usage problems exit 2; a cluster that did not answer exits 1 (as a single submit)."""
    err = UsageError(problems[0])
    err.lines = problems
    return err


# ------------------------------------------------------------------------------------------ record
@dataclass
class SweepRecord:
    sweep_id: str
    name: str
    created: float
    executor: str
    max_parallel: int | None
    keys: list[str]
    members: list[dict[str, Any]] = field(default_factory=list)  # {run_id, values}
    array_job: str | None = None  # the SLURM array job id (members are <array>_<index>)

    @property
    def run_ids(self) -> list[str]:
        return [m["run_id"] for m in self.members]

    @property
    def path(self) -> Path:
        return sweeps_dir() / self.sweep_id / SWEEP_FILE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def new_sweep_id(name: str, now: float | None = None) -> str:
    return "sweep-" + new_run_id(name, now)


def save_sweep(record: SweepRecord) -> None:
    atomic_write(record.path, record.to_json().encode())


def find_sweep(ident: str) -> SweepRecord | None:
    """The sweep with this id (or unique id prefix), None when ``ident`` names no sweep."""
    if not ident.startswith("sweep-"):
        return None
    root = sweeps_dir()
    exact = root / ident / SWEEP_FILE
    found = [exact] if exact.is_file() else sorted(root.glob(f"{ident}*/{SWEEP_FILE}"))
    if len(found) > 1:
        raise NotFound(f"{ident!r} matches several sweeps; give the full sweep id")
    if not found:
        return None
    return SweepRecord.from_dict(json.loads(found[0].read_bytes()))
