"""``pixpro status`` as a rich table (people) or JSON (scripts)."""

from __future__ import annotations

import json
import time
from typing import Any

from rich import box
from rich.console import Group
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


def _table(title: str | None = None) -> Table:
    """The style of every status table: a rule under the header and one space between columns, as
    ``squeue`` prints. No cell padding: rich wraps each padded cell in one more renderable, and drawing
    the 50-run table took twice as long with it."""
    return Table(
        title=title,
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,
    )


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
    t = _table()
    for name, justify in (
        ("RUN", "left"), ("ATTEMPTS", "left"), ("STATE", "left"), ("NODES×GPUS", "right"),
        ("STEP", "right"), ("EPOCH", "right"), ("CKPT", "right"), ("CKPT AGE", "right"), ("COMMIT", "right"),
        ("LR", "right"), ("EMA", "right"), ("IMG/S", "right"), ("KNN@1", "right"), ("ETA", "right"),
    ):  # fmt: skip
        t.add_column(name, justify="right" if justify == "right" else "left", no_wrap=name != "STATE")
    for r in rows:
        t.add_row(
            r["run_id"],
            ",".join(a["job_id"] for a in r["attempts"]) or "-",
            _state(r),
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


def _state(r: dict[str, Any]) -> Text:
    state = Text(r["state"], style=_STYLE.get(r["state"], ""))
    if r["reason"]:
        state.append(f" ({r['reason']})", style="dim")
    return state


def sweep_table(sweep_id: str, rows: list[dict[str, Any]]) -> Table:
    """One sweep: a row per member with its swept values, state, step, loss, the kNN monitor's newest
    top-1 and its latest evaluation job's result."""
    keys = list(dict.fromkeys(k for r in rows for k in r["sweep_values"]))
    t = _table(f"sweep {sweep_id}")
    t.add_column("RUN", no_wrap=True)
    for key in keys:
        t.add_column(key, justify="right", no_wrap=True)
    for name in ("ATTEMPTS", "STATE", "STEP", "LOSS", "KNN@1", "EVAL"):
        right = name in ("STEP", "LOSS", "KNN@1")
        t.add_column(name, justify="right" if right else "left", no_wrap=name not in ("STATE", "EVAL"))
    for r in rows:
        values = [json.dumps(r["sweep_values"].get(k)) for k in keys]
        attempts = ",".join(a["job_id"] for a in r["attempts"]) or "-"
        t.add_row(
            r["run_id"],
            *values,
            attempts,
            _state(r),
            _of(r["step"], r["total_steps"]),
            _num(r["loss"], ".4g"),
            _knn(r.get("knn_top1"), r.get("knn_step")),
            _latest_eval(r),
        )
    return t


def _latest_eval(r: dict[str, Any]) -> str:
    from cluster.evals import headline

    found = r.get("evals") or []
    return f"{found[-1]['task']}: {headline(found[-1])}" if found else "-"


def evals_table(rows: list[dict[str, Any]]) -> Table:
    """Every evaluation job of the runs shown (``pixpro eval --submit``): its state, then its result."""
    from cluster.evals import headline

    t = _table("evaluations")
    for name in ("RUN", "EVAL", "JOB", "AFTER", "RESULT"):
        t.add_column(name, no_wrap=name != "RESULT")
    for r in rows:
        for ev in r.get("evals") or []:
            t.add_row(r["run_id"], ev["eval_id"], ev["job_id"] or "-", ev["after"] or "-", headline(ev))
    return t


def grouped(rows: list[dict[str, Any]]) -> Group:
    """Runs outside sweeps in one table, then one table per sweep, then their evaluation jobs."""
    single = [r for r in rows if not r.get("sweep_id")]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("sweep_id"):
            sweeps.setdefault(r["sweep_id"], []).append(r)
    parts: list[Table] = [table(single)] if single else []
    parts += [sweep_table(sweep_id, members) for sweep_id, members in sweeps.items()]
    if any(r.get("evals") for r in rows):
        parts.append(evals_table(rows))
    return Group(*parts)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
