"""``pixpro status`` as a rich table (people) or JSON (scripts)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
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


# Which columns a narrow terminal keeps. A column's ``keep`` is its rank: 0 is never dropped; of the others
# the highest is dropped first. Ranks from REST on (the "rest": details a person reads after the state)
# go before a wrapping column (a state's detail) is squeezed below WRAP_AT; ranks from 1 to REST only
# once the wrapping columns are down to their narrowest.
REST = 10
WRAP_AT = 24
"""A wrapping column is squeezed below this many columns (or its content, if narrower) only after every
column from REST on is gone: ``RUNNING (restart 2)``, ``PENDING (Priority)`` stay on one line."""
FOLD_AT = 16
"""A wrapping cell's word up to this long is never folded across lines (numbers, states, job ids); a
longer one (a path, an squeue reason) folds rather than widening its column."""


@dataclass
class Col:
    """One column of a status table: its header, its cells, and how it gives way to a narrow terminal."""

    header: str
    cells: list[str | Text]
    keep: int
    right: bool = False
    wraps: bool = False  # may wrap at spaces (a state's detail, a result, "starts DATE TIME"); others never
    short: str | None = None  # a shorter header, taken before any column is dropped
    squeeze: int = 0  # a wrapping column narrower than this (or its content) is dropped instead

    def widths(self, short: bool) -> tuple[int, int]:
        """The column's full width (every cell on one line) and, for a wrapping column, the narrowest it
        may get: its header, each cell's first word (the state) and words up to FOLD_AT whole."""
        header = cell_len(self.short if short and self.short else self.header)
        plains = [c.plain if isinstance(c, Text) else c for c in self.cells]
        full = max([header, *(cell_len(p) for p in plains)])
        if not self.wraps:
            return full, full
        firsts = [cell_len(p.split()[0]) for p in plains if p.strip()]
        words = [min(FOLD_AT, cell_len(w)) for p in plains for w in p.split()]
        return full, max([header, *firsts, *words])


class Fitted:
    """A status table that fits the width it is drawn at (the terminal's, again at each ``--watch``
    refresh): it drops its least important columns, abbreviates swept keys and lets a state's detail
    wrap, and never shrinks or cuts a cell of a column it shows (no ``COMPL…``, no ``0.00…``)."""

    def __init__(self, columns: list[Col], title: str | None = None) -> None:
        self.columns, self.title = columns, title

    def fit(self, width: int | None) -> tuple[list[Col], list[int], bool]:
        """The columns shown at ``width`` (None: all), their widths, and whether short headers are used."""
        cols = list(self.columns)
        long = {id(c): c.widths(short=False) for c in cols}
        size = long

        def at(c: Col, narrowest: bool) -> int:
            """Its width: every cell on one line, or a wrapping column squeezed (to WRAP_AT, or narrowest)."""
            full, least = size[id(c)]
            return max(least, min(full, c.squeeze if narrowest else WRAP_AT)) if c.wraps else full

        def need(shown: list[Col], narrowest: bool) -> int:
            return sum(at(c, narrowest) for c in shown) + len(shown) - 1

        if width is None or sum(full for full, _ in long.values()) + len(cols) - 1 <= width:
            return cols, [long[id(c)][0] for c in cols], False
        if any(c.short for c in cols) and need(cols, False) > width:  # wrapping alone does not do
            size = {id(c): c.widths(short=True) for c in cols}
        kept = [c for c in cols if c.keep < REST]
        narrowest = need(kept, False) > width
        floor = 1 if narrowest else REST
        if narrowest:  # the rest would only squeeze the wrapping columns further
            cols = kept
        while need(cols, narrowest) > width and any(c.keep >= floor for c in cols):
            # the lowest-ranked column goes; of equals, the rightmost
            cols.remove(max(reversed([c for c in cols if c.keep >= floor]), key=lambda c: c.keep))
        widths = [at(c, narrowest) for c in cols]
        spare = width - sum(widths) - (len(cols) - 1)
        wrapping = [i for i, c in enumerate(cols) if c.wraps]
        # what is left widens the wrapping columns: first one it puts on a line each (the cheapest), then
        # the narrowest, a column at a time
        full = [size[id(c)][0] for c in cols]
        while spare > 0 and (short_by := {i: full[i] - widths[i] for i in wrapping if widths[i] < full[i]}):
            done = [i for i, n in short_by.items() if n <= spare]
            grow = min(done, key=short_by.__getitem__) if done else min(short_by, key=widths.__getitem__)
            step = short_by[grow] if done else 1
            widths[grow] += step
            spare -= step
        over = sum(widths) + len(cols) - 1 - width
        if over > 0:  # the kept columns alone are too wide: the id (first) folds, a state or step never
            widths[0] = max(1, widths[0] - over)
        return cols, widths, size is not long

    def table(self, width: int | None = None) -> Table:
        """The rich table at ``width`` columns of text (None: every column)."""
        cols, widths, short = self.fit(width)
        t = _table(self.title)
        for c, w in zip(cols, widths, strict=True):
            # explicit widths; "fold" only matters on a terminal too narrow for RUN, STATE and STEP alone
            t.add_column(
                c.short if short and c.short else c.header,
                justify="right" if c.right else "left",
                width=w,
                overflow="fold",
            )
        for row in zip(*(c.cells for c in cols), strict=True):
            t.add_row(*row)
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        kept = [c.widths(short=True) for c in self.columns if c.keep == 0]
        everything = self.fit(None)[1]
        return Measurement(
            sum(least for _, least in kept) + len(kept) - 1, sum(everything) + len(everything) - 1
        )


def table(rows: list[dict[str, Any]]) -> Fitted:
    """Runs outside sweeps. Kept at any width: RUN, STATE and STEP. A narrow terminal lets the state's
    detail wrap, drops COMMIT first, then CKPT, EPOCH, NODES×GPUS, IMG/S, ATTEMPTS and KNN@1, and only
    then (the detail down to its longest word) ETA, EMA, LR and CKPT AGE: 80 columns keep those four for
    run ids of about 25 characters and short steps."""
    return Fitted(
        [
            Col("RUN", [r["run_id"] for r in rows], 0),
            Col("ATTEMPTS", [_attempts(r) for r in rows], REST + 1),
            Col("STATE", [_state(r) for r in rows], 0, wraps=True),
            Col("NODES×GPUS", [f"{r['nodes']}×{r['gpus_per_node']}" for r in rows], REST + 3, right=True),
            Col("STEP", [_of(r["step"], r["total_steps"]) for r in rows], 0, right=True),
            Col("EPOCH", [_num(r["epoch"], "d") for r in rows], REST + 4, right=True),
            Col("CKPT", [_num(r["checkpoint_step"], "d") for r in rows], REST + 5, right=True),
            Col("CKPT AGE", [age(r["checkpoint_age_s"]) for r in rows], 1, right=True),
            Col("COMMIT", [_commit(r) for r in rows], REST + 6, right=True),
            Col("LR", [_num(r["lr"], ".3g") for r in rows], 2, right=True),
            Col("EMA", [_num(r["ema_momentum"], ".5f") for r in rows], 3, right=True),
            Col("IMG/S", [_num(r["img_per_s"], ".1f") for r in rows], REST + 2, right=True),
            Col("KNN@1", [_knn(r.get("knn_top1"), r.get("knn_step")) for r in rows], REST, right=True),
            Col("ETA", [eta(r) for r in rows], 4, right=True, wraps=True, squeeze=11),
        ]
    )


def _attempts(r: dict[str, Any]) -> str:
    return ",".join(a["job_id"] for a in r["attempts"]) or "-"


def _commit(r: dict[str, Any]) -> str:
    return "-" if r.get("commit_s") is None else f"{r['commit_s']:.1f}s"


def _state(r: dict[str, Any]) -> Text:
    state = Text(r["state"], style=_STYLE.get(r["state"], ""))
    if r["reason"]:
        state.append(f" ({r['reason']})", style="dim")
    return state


def sweep_table(sweep_id: str, rows: list[dict[str, Any]]) -> Fitted:
    """One sweep: a row per member with its swept values, state, step, loss, the kNN monitor's newest
    top-1, its latest evaluation job's result and its ETA. Kept at any width: RUN, STATE and STEP. A
    narrow terminal shortens the swept keys to their last part (``base_lr``), lets the state's detail and
    EVAL wrap, drops ATTEMPTS, and only then drops EVAL (the evaluations table below has it too), ETA,
    KNN@1, LOSS and the swept values, the last key first."""
    keys = list(dict.fromkeys(k for r in rows for k in r["sweep_values"]))
    ends = [k.rsplit(".", 1)[-1] for k in keys]
    unique = len(set(ends)) == len(ends)
    swept = [
        Col(k, [json.dumps(r["sweep_values"].get(k)) for r in rows], 1, True, short=e if unique else None)
        for k, e in zip(keys, ends, strict=True)
    ]
    return Fitted(
        [
            Col("RUN", [r["run_id"] for r in rows], 0),
            *swept,
            Col("ATTEMPTS", [_attempts(r) for r in rows], REST),
            Col("STATE", [_state(r) for r in rows], 0, wraps=True),
            Col("STEP", [_of(r["step"], r["total_steps"]) for r in rows], 0, right=True),
            Col("LOSS", [_num(r["loss"], ".4g") for r in rows], 2, right=True),
            Col("KNN@1", [_knn(r.get("knn_top1"), r.get("knn_step")) for r in rows], 3, right=True),
            Col("EVAL", [_latest_eval(r) for r in rows], 5, wraps=True, squeeze=WRAP_AT),
            Col("ETA", [eta(r) for r in rows], 4, right=True, wraps=True, squeeze=11),
        ],
        f"sweep {sweep_id}",
    )


def _latest_eval(r: dict[str, Any]) -> str:
    from cluster.evals import headline

    found = r.get("evals") or []
    return f"{found[-1]['task']}: {headline(found[-1])}" if found else "-"


def evals_table(rows: list[dict[str, Any]]) -> Fitted:
    """Every evaluation job of the runs shown (``pixpro eval --submit``): its state, then its result (which
    wraps); JOB and AFTER go first on a narrow terminal."""
    from cluster.evals import headline

    found = [(r, ev) for r in rows for ev in r.get("evals") or []]
    return Fitted(
        [
            Col("RUN", [r["run_id"] for r, _ in found], 0),
            Col("EVAL", [ev["eval_id"] for _, ev in found], 0),
            Col("JOB", [ev["job_id"] or "-" for _, ev in found], REST),
            Col("AFTER", [ev["after"] or "-" for _, ev in found], REST + 1),
            Col("RESULT", [headline(ev) for _, ev in found], 0, wraps=True),
        ],
        "evaluations",
    )


def grouped(rows: list[dict[str, Any]], by_sweep: bool = True) -> Group:
    """Runs outside sweeps in one table, then one table per sweep, then their evaluation jobs; each fits
    the console's width when it is drawn. ``by_sweep=False`` (``pixpro status MEMBER``): every run in the
    runs table, its full row."""
    single = [r for r in rows if not (by_sweep and r.get("sweep_id"))]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if by_sweep and r.get("sweep_id"):
            sweeps.setdefault(r["sweep_id"], []).append(r)
    parts: list[Fitted] = [table(single)] if single else []
    parts += [sweep_table(sweep_id, members) for sweep_id, members in sweeps.items()]
    if any(r.get("evals") for r in rows):
        parts.append(evals_table(rows))
    return Group(*parts)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
