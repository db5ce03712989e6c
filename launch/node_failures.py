"""Which node a failure is blamed on: each node's agent writes one record per rank that failed through
no fault of the run, so the next attempt can leave out a node that keeps failing.

Blamed on the node: a rank killed by a signal nobody in pixpro sent (SIGKILL from the kernel, SIGSEGV,
SIGBUS, SIGABRT), a rank the hang watchdog found stuck, and a rank whose log ends in a CUDA error
(a fault of the GPU or its driver, not an out-of-memory). Not blamed: preemption and cancel signals,
the watchdog's own kills of the healthy ranks, and Python exceptions (the run's fault, or the echo of
another node's failure in a collective), SIGABRT from NCCL's own watchdog included (a collective that
timed out or whose peer went away: the waiting ranks abort, the failed one is elsewhere). The records
go to the run folder (:data:`schemas.contract.NODE_FAILURES_DIR`), which the login node reads
(:mod:`cluster.nodes`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from schemas.contract import MAX_LINE, SLURM_NODE_NAME, NodeFailure, node_failure_file, one_line

NOT_THE_NODE = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}
)
"""Signals of a preemption, a cancel or a user: the run stops, the node is not at fault."""
GPU_FAULT = re.compile(
    r"CUDA error: (?!out of memory)[^\n]*|unhandled cuda error[^\n]*|uncorrectable ECC error[^\n]*"
    r"|CUBLAS_STATUS_(?:EXECUTION_FAILED|INTERNAL_ERROR)|CUDNN_STATUS_(?:EXECUTION_FAILED|INTERNAL_ERROR)"
)
NCCL_ECHO = re.compile(
    r"To avoid data inconsistency, we are taking the entire process down"
    r"|Watchdog caught collective operation timeout|ncclRemoteError"
)
"""What ProcessGroupNCCL's watchdog writes before it aborts a rank (torch's libtorch_cuda): a collective
that timed out, or a peer that went away. The rank waited on another; its SIGABRT is not its node's."""
LOG_TAIL = 64 * 1024  # bytes of a rank's stderr read for the CUDA error that ended it


def node_name() -> str:
    return os.environ.get(SLURM_NODE_NAME) or socket.gethostname()


def _tail(stderr_path: str | None) -> str:
    if not stderr_path:
        return ""
    try:
        with open(stderr_path, "rb") as f:
            f.seek(max(0, os.path.getsize(stderr_path) - LOG_TAIL))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def gpu_fault(stderr_path: str | None) -> str | None:
    """The CUDA error line at the end of a rank's stderr, if one ended it."""
    return _gpu_fault_in(_tail(stderr_path))


def _gpu_fault_in(tail: str) -> str | None:
    found = GPU_FAULT.findall(tail)
    return one_line(found[-1], MAX_LINE) if found else None


def cause_of(exitcode: int, stderr_path: str | None) -> str | None:
    """Why a rank that exited with ``exitcode`` failed, when the node is to blame; else None."""
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"killed by signal {-exitcode}"
        if sig == signal.SIGABRT:  # NCCL's watchdog aborts on a GPU fault too: that one is the node's
            tail = _tail(stderr_path)
            fault = _gpu_fault_in(tail)
            if fault:
                return f"killed by SIGABRT after {fault}"
            if NCCL_ECHO.search(tail):
                return None
        return None if sig in NOT_THE_NODE else f"killed by {sig.name}"
    if exitcode > 0:
        fault = gpu_fault(stderr_path)
        return f"exited with status {exitcode} after {fault}" if fault else None
    return None


class NodeFailures:
    """This node's failure records; the agent's one instance (:data:`RECORDER`)."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node  # default: this process's node (:func:`node_name`)
        self.run_dir: Path | None = None
        self.attempt = ""
        self._ours: set[int] = set()  # pids the watchdog killed: their SIGKILL is not the node's doing

    def open(self, run_dir: Path | None, attempt: str) -> None:
        self.run_dir, self.attempt = run_dir, attempt

    def ignore(self, pid: int) -> None:
        self._ours.add(pid)

    def record(self, rank: int, cause: str) -> None:
        failure = NodeFailure(
            node=self.node or node_name(), rank=rank, attempt=self.attempt, cause=cause, time=time.time()
        )
        print(f"pixpro: rank {rank} failed on node {failure.node}: {cause}", file=sys.stderr, flush=True)
        if self.run_dir is None:
            return
        path = self.run_dir / node_failure_file(failure)
        with contextlib.suppress(OSError):  # a record lost is a node not left out, never a failed agent
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(failure.model_dump_json())

    def failed(self, failures: dict[int, Any], stderrs: dict[int, str]) -> None:
        """torchrun's failed workers (global rank -> ProcessFailure) at the end of a round."""
        for rank, failure in sorted(failures.items()):
            if failure.pid in self._ours:
                continue
            cause = cause_of(int(failure.exitcode), stderrs.get(failure.local_rank))
            if cause is not None:
                self.record(rank, cause)


RECORDER = NodeFailures()
