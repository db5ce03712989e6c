"""Job logs: where they are, ``--rank`` filtering, and following them until the attempt ends.

SLURM: submitit's ``<run_dir>/submitit/<job>_<node>_log.out`` (stdout and stderr together; requeued
attempts of the same job id append to the same file). Local: ``<run_dir>/local/<job>.log``.
torchrun tees every worker line with a ``[rank<R>]: `` prefix, which ``--rank`` selects.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from cluster.attempts import AttemptState, follow_exit_code
from cluster.executors import executor
from cluster.record import RunRecord

POLL_S = 0.5
STATE_EVERY_S = 2.0


def log_files(record: RunRecord, job_id: str) -> list[Path]:
    return executor(record.executor).job(record, job_id).log_files()


def rank_filter(rank: int | None) -> Callable[[str], bool]:
    if rank is None:
        return lambda line: True
    prefix = f"[rank{rank}]:"
    return lambda line: line.startswith(prefix)


def print_logs(files: list[Path], rank: int | None, out: TextIO) -> tuple[int, int]:
    """Print what is there now; returns (files found, lines printed)."""
    keep = rank_filter(rank)
    found = [f for f in files if f.exists()]
    printed = 0
    for path in found:
        if len(found) > 1 and rank is None:
            out.write(f"==> {path} <==\n")
        with open(path, errors="replace") as fh:
            for line in fh:
                if keep(line):
                    out.write(line)
                    printed += 1
    out.flush()
    return len(found), printed


class _Tail:
    """New complete lines of several growing files (created late, appended to across requeues)."""

    def __init__(self, files: list[Path], rank: int | None, out: TextIO) -> None:
        self.files = files
        self.keep = rank_filter(rank)
        self.out = out
        self.pos = dict.fromkeys(files, 0)
        self.partial = dict.fromkeys(files, "")
        self.tag = len(files) > 1 and rank is None

    def pump(self, final: bool = False) -> None:
        for i, path in enumerate(self.files):
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.pos[path])
                    data = fh.read()
            except FileNotFoundError:
                continue
            self.pos[path] += len(data)
            text = self.partial[path] + data.decode(errors="replace")
            lines = text.split("\n")
            self.partial[path] = "" if final else lines.pop()
            for line in lines:
                if line and self.keep(line):
                    self.out.write(f"node{i}| {line}\n" if self.tag else line + "\n")
        self.out.flush()


def follow(
    record: RunRecord,
    job_id: str,
    rank: int | None,
    state_of: Callable[[], AttemptState],
    out: TextIO = sys.stdout,
) -> int:
    """Stream the logs until the attempt ends; returns its exit status (see states.follow_exit_code).

    An ended SLURM state must hold for a while before it counts: a preempted job is requeued under
    the same id a moment later and its log goes on.
    """
    job = executor(record.executor).job(record, job_id)
    tail = _Tail(job.log_files(), rank, out)
    ended_since: float | None = None
    next_check = 0.0
    while True:
        tail.pump()
        now = time.monotonic()
        if now >= next_check:
            next_check = now + STATE_EVERY_S
            state = state_of()
            if state.active:
                ended_since = None
            else:
                ended_since = ended_since or now
                if now - ended_since >= job.settle_s(state):
                    time.sleep(POLL_S)
                    tail.pump(final=True)
                    return follow_exit_code(state)
        time.sleep(POLL_S)
