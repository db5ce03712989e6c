"""What an evaluation job runs: :mod:`launch.eval_job` in a child process, from the run's working
directory (relative data paths in its spec resolve there).

On SLURM, :class:`EvalTask` is the callable submitit pickles; a failed evaluation raises, so the job
ends FAILED. On the local executor ``python -m cluster.eval_runner RUN_DIR JOB_ID EVAL_ID`` runs
detached (:func:`cluster.local.spawn`): with ``--after`` it first waits until the run's latest attempt
completed, as SLURM's ``afterok`` re-pointed by ``pixpro resume`` would: an attempt cancelled, failed
or preempted leaves it waiting for the next one (``pixpro cancel`` of its job ends it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cluster.attempts import local_state
from cluster.evals import waits_on
from cluster.local import LocalJob, read_job, write_job
from cluster.record import read_local
from schemas.contract import EvalRequest, Exit, RunPaths

POLL_S = 2.0


class EvalFailed(RuntimeError):
    """The evaluation ended with a non-zero exit status (its result says why)."""


@dataclass
class EvalTask:
    run_dir: str
    eval_id: str
    workdir: str

    def command(self) -> list[str]:
        return [sys.executable, "-u", "-m", "launch.eval_job", self.run_dir, self.eval_id]

    def __call__(self) -> None:
        rc = subprocess.call(self.command(), cwd=self.workdir)
        if rc != 0:
            raise EvalFailed(f"eval {self.eval_id} of {self.run_dir} exited {rc}")


def wait_for_run(run_dir: Path) -> None:
    """Return once the run's latest attempt completed (none yet: a sweep member the local sweep runner
    has not started)."""
    while True:
        record = read_local(run_dir)
        job = record.latest_job
        if job is not None and local_state(read_job(run_dir, job), None, False).state == "COMPLETED":
            return
        time.sleep(POLL_S)


@contextlib.contextmanager
def held_signal(sig: int) -> Iterator[None]:
    """``sig`` blocked in this thread for the block; one that came meanwhile is taken on leaving."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _unblock_sigterm() -> None:
    """In the child: the mask is inherited, and the evaluation must take SIGTERM (a cancel)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def main(argv: list[str]) -> int:
    run_dir, job_id, eval_id = Path(argv[0]), argv[1], argv[2]
    paths = RunPaths(run_dir).eval(eval_id)
    request = EvalRequest.model_validate_json(paths.request.read_bytes())
    record = read_local(run_dir)
    task = EvalTask(str(run_dir), eval_id, record.workdir)
    child: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        for proc in child:
            proc.terminate()
        if not child:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    job = LocalJob(job_id, os.getpid(), time.time(), None, None)
    write_job(run_dir, job)
    rc: int = Exit.FAILURE
    try:
        if waits_on(request) is not None:  # a job of the run or its latest attempt: the latest, as afterok
            wait_for_run(run_dir)
        with held_signal(signal.SIGTERM):  # a cancel now waits until the child is there to be stopped
            child.append(subprocess.Popen(task.command(), cwd=task.workdir, preexec_fn=_unblock_sigterm))
        rc = child[0].wait()
    finally:
        job.ended, job.exit_code = time.time(), rc
        write_job(run_dir, job)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
