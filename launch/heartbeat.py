"""Each rank's progress, published where its node's agent reads it without the rank's help.

A rank rewrites a small file in the agent's heartbeat folder (``PIXPRO_HEARTBEAT_DIR``, node-local) at
every step and checkpoint phase: one ``pwrite`` of a fixed-size JSON line, no flush, no collective.
The agent's watchdog (:mod:`launch.watchdog`) reads the files; a rank that is stopped, stuck in a
collective or in a driver call simply stops rewriting its file. ``faulthandler`` answers
:data:`DUMP_SIGNAL` with every thread's stack on stderr (the rank log): it runs in C, without the GIL,
so a rank stuck in a C call still dumps.

Torch-free; without the environment variable (a lone ``python -m launch.train``) every call is a no-op.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

from schemas.contract import HEARTBEAT_DIR_ENV as DIR_ENV

DUMP_SIGNAL = signal.SIGRTMIN + 2
"""Asks a rank for its Python stacks (SIGUSR1/2 may be the preemption signal, NCCL may use SIGUSR1)."""
RECORD_BYTES = 512  # one fixed-size record overwritten in place: a reader never sees a shorter file


def rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.beat")


class Heartbeat:
    """This rank's heartbeat file: the hang timeout from the first step after the attempt's first, the
    start-up timeout before it."""

    def __init__(self, directory: str, rank: int, timeout_s: float, startup_s: float) -> None:
        self.rank, self.timeout_s, self.startup_s = rank, timeout_s, startup_s
        self.fd = os.open(rank_file(directory, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.first_step: int | None = None

    def beat(self, step: int, phase: str, limit_s: float | None = None) -> None:
        """``limit_s``: this phase's own deadline (the final flush), to which the hang timeout is added;
        else the hang timeout once the attempt's first step is done, the start-up timeout before (the
        checkpoint load, a cold cache and the first step's compile come then)."""
        if phase == "train" and self.first_step is None:
            self.first_step = step
        armed = self.first_step is not None and step > self.first_step
        if limit_s is not None:  # a phase with its own deadline: that, and the hang timeout past it
            limit: float = limit_s + self.timeout_s
        else:
            limit = self.timeout_s if armed else max(self.startup_s, self.timeout_s)
        rec = {"rank": self.rank, "pid": os.getpid(), "step": step, "phase": phase, "time": time.time()}
        line = json.dumps(rec | {"limit_s": limit}).encode()[: RECORD_BYTES - 1]
        os.pwrite(self.fd, line.ljust(RECORD_BYTES - 1) + b"\n", 0)


_current: Heartbeat | None = None


def install(rank: int, timeout_s: float, startup_s: float) -> None:
    """Register the stack dump and open this rank's heartbeat file (phase ``starting``)."""
    global _current
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    directory = os.environ.get(DIR_ENV)
    if directory and os.path.isdir(directory):
        _current = Heartbeat(directory, rank, timeout_s, startup_s)
        _current.beat(0, "starting")


def beat(step: int, phase: str, limit_s: float | None = None) -> None:
    """Publish progress: ``phase`` at ``step`` (steps done so far); see :meth:`Heartbeat.beat`."""
    if _current is not None:
        _current.beat(step, phase, limit_s)


def read(path: str) -> dict | None:
    """A heartbeat file's record (None while it is being created or is unreadable)."""
    try:
        with open(path, "rb") as f:
            rec = json.loads(f.read().strip() or b"null")
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None
