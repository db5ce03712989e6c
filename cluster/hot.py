"""What ``pixpro validate`` and ``pixpro status`` do, free of Typer: the two commands typed most are
answered by the console script's fast path (:mod:`cluster.entry`) without building the command tree,
and by the Typer app (:mod:`cluster.cli`) with the same code. Heavy modules are imported inside."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster import errors
from cluster.exits import say
from schemas.contract import one_line

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")


def echo(text: str, nl: bool = True) -> None:
    """``typer.echo`` for what this module prints: ASCII (``json.dumps`` escapes everything else, so
    there is no colour code for ``typer.echo`` to strip)."""
    sys.stdout.write(text + "\n" if nl else text)
    sys.stdout.flush()


def check_id(ident: str) -> str:
    """Run and job ids are short words: refuse anything else before any lookup (an empty id must not
    mean "all runs", an option-like one must not reach a subprocess)."""
    if not _ID.fullmatch(ident):
        shown = one_line(repr(ident), 60)
        raise errors.UsageError(f"ID {shown}: not a run or job id (letters, digits, _ . : -; at most 128)")
    return ident


def validate(spec: Path, sets: Sequence[str] | None, deep: bool) -> None:
    from cluster.specs import resolve_spec, spec_json

    resolved = resolve_spec(spec, overrides=sets or ())
    if deep:
        from cluster.preflight import run_preflight

        summary = run_preflight(resolved)
        say(f"preflight passed in {summary.get('total_s', '?')} s (loss {summary.get('loss', 0):.4g})")
    echo(spec_json(resolved), nl=False)


def status(ident: str | None, as_json: bool, watch: bool, interval: float) -> None:
    if not (math.isfinite(interval) and 0.5 <= interval <= 3600):
        raise errors.UsageError(f"--interval {interval}: must be a number of seconds from 0.5 to 3600")
    if as_json and watch:
        raise errors.UsageError("--json and --watch: --json answers once (for a script to call in a loop)")
    if ident is not None:
        check_id(ident)
    from cluster.index import Index
    from cluster.status import checkpoint_warnings, collect
    from cluster.sweep import find_sweep

    index = Index()
    group = find_sweep(ident) if ident else None
    if ident and not group:  # a run, or the run of an evaluation's job
        from cluster.evals import find_run

        ident = find_run(index, ident)[0].run_id

    def rows() -> tuple[list[dict[str, Any]], list[str]]:
        records = (
            ([index.find(r) for r in group.run_ids] if group else [index.find(ident)])
            if ident
            else index.all()
        )
        found, warnings = collect(records)
        unreadable = [r for r in found if r["store_error"]]
        warnings += [
            f"run {r['run_id']}: cannot read {r['checkpoint_url']}: {r['store_error']}" for r in unreadable
        ]
        warnings += [w for r in found for w in checkpoint_warnings(r)]
        return found, warnings

    if as_json:
        found, warnings = rows()
        for w in warnings:
            say(f"warning: {w}")
        echo(json.dumps(found[0] if ident and not group else found, indent=2, sort_keys=True))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(rows)  # SLURM answers while rich is imported
        from rich.console import Console

        from cluster import render

        # cells are data (paths, reasons, swept values): printed as they are, never read as rich markup
        console = Console(width=None if sys.stdout.isatty() else 200, markup=False, emoji=False)
        answer = first.result()

    def view(answer: tuple[list[dict[str, Any]], list[str]] | None = None) -> Any:
        found, warnings = answer or rows()
        for w in warnings:
            say(f"warning: {w}")
        if not found:
            return "No runs yet. Start one with: pixpro submit SPEC  (runs are kept in $PIXPRO_HOME)"
        return render.grouped(found, by_sweep=not ident or group is not None)  # one member: its full row

    if not watch:
        console.print(view(answer))
        return
    from rich.live import Live

    try:
        with Live(view(answer), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(view(), refresh=True)
    except KeyboardInterrupt:
        return
