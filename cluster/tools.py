"""The compute-side tools (export, eval, plot) that the CLI runs in their own process: the login node
never imports torch. Which run a tool reads is resolved here, as ``pixpro status`` resolves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from cluster import errors
from cluster.hot import check_id


def run_tool(module: str, args: list[str]) -> None:
    """Run ``python -m launch.tools.<module>`` with the run's folder resolved; its exit status is ours."""
    raise typer.Exit(subprocess.call([sys.executable, "-m", f"launch.tools.{module}", *args]))


def source(ident: str, strict: bool = True) -> str:
    """A run id (an attempt's job id, a unique id prefix) names its run folder (checkpoints and spec.json
    inside); a path or URL passes as given. A sweep's id or an evaluation's job id is refused in one line,
    as is an id nothing has (not "checkpoint store ID does not exist")."""
    from cluster.home import run_dir

    if "/" in ident or ident.endswith(".pt") or Path(ident).exists():
        return ident
    if run_dir(ident).is_dir():
        return str(run_dir(ident))
    if not strict:  # --random-init: the architecture, which needs no run
        return ident
    from cluster import evals
    from cluster.index import Index
    from cluster.sweep import find_sweep

    if find_sweep(check_id(ident)) is not None:
        raise errors.UsageError(f"{ident} is a sweep: give a member's run id (pixpro status {ident})")
    record, request = evals.find_run(Index(), ident)
    if request is not None:
        raise errors.UsageError(
            f"{ident} is the job of evaluation {request.eval_id} of run {record.run_id}: give the run id"
        )
    return record.run_dir
