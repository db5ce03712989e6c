"""One check in this process: ``python -m gpu_checks.child NAME CTX RESULT BUDGET`` (the runner's call,
or :func:`exit_now` of :func:`main` in a child the runner forked).

The check's deadline is :data:`gpu_checks.plan.GRACE_S` inside the runner's kill, and its record is
written whatever happens, so a check that runs out or fails keeps what it measured.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from gpu_checks.plan import BY_NAME, GRACE_S
from gpu_checks.record import Rec


def main(argv: list[str]) -> int:
    name, ctx_path, result_path, budget = argv[0], Path(argv[1]), Path(argv[2]), float(argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check = BY_NAME[name]
    rec = Rec(result_path, name, check.title, budget)
    rec.save()
    from gpu_checks.common import CheckTimeout, Ctx, Deadline, one_line

    try:
        ctx = Ctx(json.loads(ctx_path.read_text()))
        module, func = check.entry.split(":")
        fn = getattr(importlib.import_module(f"gpu_checks.{module}"), func)
        status, reason = fn(ctx, rec, Deadline(max(budget - GRACE_S, 1.0)))
    except CheckTimeout as exc:
        status, reason = "timeout", str(exc)
    except Exception as exc:
        traceback.print_exc()
        status, reason = "error", one_line(exc)
    rec.finish(status, reason)
    return 0


def exit_now(code: int) -> None:
    """The record is written: skip the interpreter's teardown (trainers' uploader handshakes, loader
    workers, process groups), which can take seconds and is no part of what a check measures."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
