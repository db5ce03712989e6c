"""An evaluation run as a job (``pixpro eval --submit``): read the request, evaluate the run's latest
committed checkpoint, write the result into the run folder.

    python -m launch.eval_job RUN_DIR EVAL_ID

The login node wrote ``evals/<eval_id>/request.json`` (:class:`schemas.contract.EvalRequest`); this
writes ``result.json`` (:class:`schemas.contract.EvalResult`) twice: ``running`` when it starts, then
``completed`` with the tool's whole result or ``failed`` with one error line, each atomically, so
``pixpro status`` never reads half a file. Exit status: the tool's (0, 2 bad input, 3 no checkpoint).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from schemas.contract import EvalPaths, EvalRequest, EvalResult, Exit, RunPaths, atomic_write, one_line


def write_result(paths: EvalPaths, result: EvalResult) -> None:
    atomic_write(paths.result, result.model_dump_json(indent=2).encode())


def evaluate(run_dir: Path, request: EvalRequest) -> dict[str, Any]:
    """The tool of ``pixpro eval --task`` on the run folder (its latest committed checkpoint)."""
    workers = int(request.resources.get("workers") or 0)
    if request.task == "dense":
        from launch.tools import probe

        return asdict(probe.run(str(run_dir), None, Path(request.data), seed=request.seed))
    from launch.tools import classify

    found = classify.run(str(run_dir), None, request.data, request.task, seed=request.seed, workers=workers)
    return asdict(found)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m launch.eval_job RUN_DIR EVAL_ID", file=sys.stderr)
        return Exit.USAGE
    run_dir = Path(args[0])
    paths = RunPaths(run_dir).eval(args[1])
    request = EvalRequest.model_validate_json(paths.request.read_bytes())
    started = time.time()
    write_result(paths, EvalResult(state="running", started=started))

    def ended(**fields: Any) -> None:
        write_result(paths, EvalResult(started=started, ended=time.time(), **fields))

    from launch.tools.weights import WeightsError

    try:
        result = evaluate(run_dir, request)
    except WeightsError as exc:
        print(f"pixpro eval: error: {exc}", file=sys.stderr, flush=True)
        ended(state="failed", error=one_line(exc))
        return exc.exit_code
    except BaseException as exc:  # a crash (or a signal's KeyboardInterrupt) still ends as failed
        ended(state="failed", error=one_line(f"{type(exc).__name__}: {exc}"))
        raise
    ended(state="completed", step=result.get("step"), result=result)
    print(f"pixpro eval {request.eval_id}: completed at step {result.get('step')}", flush=True)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
