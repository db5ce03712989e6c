"""One check in this process: ``python -m gpu_checks.child NAME CTX RESULT BUDGET`` (the runner's call).

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


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The record is written: skip the interpreter's teardown (trainers' uploader handshakes, loader
    # workers, process groups), which can take seconds and is no part of what a check measures.
    os._exit(code)
