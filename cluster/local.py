"""The local executor: one detached process per attempt, for laptops, demos and login-node tests.

Not submitit's LocalExecutor: its controller stays in the caller's process group and session (Ctrl-C
on ``--follow`` or closing the terminal would kill the training), its timeout defaults to 2 minutes,
and its job id is a pid that leaves no record once the controller is gone. Here ``pixpro submit``
starts ``python -m cluster.local RUN_DIR JOB_ID`` in a new session; it runs the same
:class:`~cluster.node_task.NodeTask` as a SLURM node and records its pid and exit status in
``<run_dir>/local/<job_id>.json``, which ``pixpro status`` reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cluster.record import atomic_write, read_local
from schemas.contract import Exit, RunPaths, user_signal

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def state_path(run_dir: Path, job_id: str) -> Path:
    return RunPaths(run_dir).local / f"{job_id}.json"


def log_path(run_dir: Path, job_id: str) -> Path:
    return RunPaths(run_dir).local / f"{job_id}.log"


@dataclass
class LocalJob:
    job_id: str
    pid: int | None
    started: float | None
    ended: float | None
    exit_code: int | None

    @property
    def alive(self) -> bool:
        return self.ended is None and self.pid is not None and _is_our_runner(self.pid, self.job_id)


RUNNERS = ("cluster.local", "cluster.eval_runner")
"""The modules a local job runs: an attempt's node task, or an evaluation (:mod:`cluster.eval_runner`)."""


def _is_our_runner(pid: int, job_id: str) -> bool:
    """The pid is alive and is this job's runner (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(m.encode() in cmdline for m in RUNNERS) and job_id.encode() in cmdline


def read_job(run_dir: Path, job_id: str) -> LocalJob | None:
    try:
        data = json.loads(state_path(run_dir, job_id).read_bytes())
    except (OSError, ValueError):
        return None
    return LocalJob(job_id, data.get("pid"), data.get("started"), data.get("ended"), data.get("exit_code"))


def write_job(run_dir: Path, job: LocalJob) -> None:
    atomic_write(state_path(run_dir, job.job_id), json.dumps(vars(job), sort_keys=True).encode())


def spawn(run_dir: Path, job_id: str, workdir: Path, runner: str = RUNNERS[0], *args: str) -> int:
    """Start the runner detached (own session, stdin closed, output to the job's log); returns its pid."""
    log = log_path(run_dir, job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", runner, str(run_dir), job_id, *args],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if not state_path(run_dir, job_id).exists():  # the runner writes it too, and its end status last
        write_job(run_dir, LocalJob(job_id, proc.pid, time.time(), None, None))
    return proc.pid


def stop(job: LocalJob) -> bool:
    """Ask a running local attempt to checkpoint and stop (SIGTERM to its runner)."""
    if not job.alive or job.pid is None:
        return False
    try:
        os.kill(job.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> int:
    # here, not at the top: ``pixpro status`` reads local job records through this module
    from cluster.node_task import EXIT_PREEMPTED, JobContext, NodeTask, TrainerFailed

    run_dir, job_id = Path(argv[0]), argv[1]
    record = read_local(run_dir)
    task = NodeTask.for_run(record)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) >= 3:  # asked three times: stop now, the last committed checkpoint stands
            task.forward(signal.SIGKILL)
            return
        task.forward(
            user_signal(task.signal_name) if signum in (signal.SIGUSR1, signal.SIGUSR2) else signal.SIGTERM
        )

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    job = LocalJob(job_id, os.getpid(), time.time(), None, None)
    write_job(run_dir, job)
    ctx = JobContext.local(job_id)
    try:
        rc = task.run(ctx)
    except TrainerFailed as exc:
        print(f"pixpro: {exc}", file=sys.stderr, flush=True)
        rc = exc.status
    except Exception as exc:
        print(f"pixpro: local runner failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        rc = Exit.FAILURE
    job.ended, job.exit_code = time.time(), rc
    write_job(run_dir, job)
    return rc if rc in (Exit.OK, EXIT_PREEMPTED) else (rc or Exit.FAILURE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
