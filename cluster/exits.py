"""How a command's exceptions end the process: one line per problem on stderr and a documented exit
status, never a traceback. Free of Typer, so the console script's fast path (:mod:`cluster.entry`) and the
Typer app (:func:`cluster.cli.guard`) end alike."""

from __future__ import annotations

import os
import sys

from cluster.errors import EXIT_FAILURE, EXIT_USAGE, PixproError
from schemas.contract import DEBUG_ENV, Exit, one_line


def say(line: str) -> None:
    print(one_line(f"pixpro: {line}"), file=sys.stderr, flush=True)  # 200 characters in all


def exit_status(exc: BaseException) -> int | None:
    """Print what ``exc`` means to the user and return the exit status; None: let it propagate (a bug
    shown in full with PIXPRO_DEBUG=1, an OSError without a path, anything not an Exception)."""
    if isinstance(exc, PixproError):
        for line in exc.lines:
            say(line)
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        say("interrupted")
        return Exit.INTERRUPTED
    if isinstance(exc, OSError):
        if exc.filename is None or os.environ.get(DEBUG_ENV):
            return None
        # a path the user gave: too long, a folder, no permission... one line, exit 2
        say(f"{one_line(exc.filename, 100)}: {exc.strerror or type(exc).__name__}")
        return EXIT_USAGE
    if not isinstance(exc, Exception):
        return None
    # the spec models are only loaded by commands that read specs (status must not build them)
    spec_error = getattr(sys.modules.get("schemas.spec.errors"), "SpecError", None)
    if spec_error is not None and isinstance(exc, spec_error):
        for line in exc.problems:
            say(line)
        return EXIT_USAGE
    if os.environ.get(DEBUG_ENV):
        return None
    detail = " ".join(str(exc).split())[:300]
    say(f"internal error: {type(exc).__name__}: {detail} (PIXPRO_DEBUG=1 shows more)")
    return EXIT_FAILURE
