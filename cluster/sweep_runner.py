"""The local executor's sweep runner: a detached process that starts members as slots free up.

SLURM bounds a job array's running tasks itself (``--array=...%N``); on this machine a sweep with
``--max-parallel`` below its size gets this runner, which starts each member's first attempt (as
``pixpro submit`` would) once fewer than N members run, in order. A member cancelled or resumed
before its turn is left out; the member's start lock (:func:`cluster.record.run_lock`) keeps the runner and a
``pixpro cancel``/``resume`` of the member from acting at the same moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster import local
from cluster.record import RunBusy, RunRecord, atomic_write, run_lock

POLL_S = 0.5
RUNNER_FILE = "runner.json"
RUNNER_LOG = "runner.log"


def spawn_sweep_runner(sweep_dir: Path, resume: list[str] | None = None) -> int:
    """Start the runner detached (own session, output to the sweep's runner.log); returns its pid. With
    ``resume``: it resumes those members (``pixpro resume SWEEP`` beyond ``--max-parallel``) instead of
    starting first attempts."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    args = ["--resume", *resume] if resume else []
    with open(sweep_dir / RUNNER_LOG, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "cluster.sweep_runner", str(sweep_dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    runner = {"pid": proc.pid, "resume": resume or []}
    atomic_write(sweep_dir / RUNNER_FILE, json.dumps(runner).encode())
    return proc.pid


def runner_alive(sweep_dir: Path) -> bool:
    """The sweep's runner is still starting members (pid alive and running this module)."""
    try:
        pid = int(json.loads((sweep_dir / RUNNER_FILE).read_bytes())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return b"cluster.sweep_runner" in cmdline and str(sweep_dir).encode() in cmdline


def runner_resumes(sweep_dir: Path) -> set[str]:
    """The members a live runner will still resume (or has resumed)."""
    if not runner_alive(sweep_dir):
        return set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return set(json.loads((sweep_dir / RUNNER_FILE).read_bytes()).get("resume") or [])
    return set()


def running(record: RunRecord) -> bool:
    """The member's latest local attempt has not ended."""
    job_id = record.latest_job
    if job_id is None:
        return False
    job = local.read_job(Path(record.run_dir), job_id)
    return job is not None and job.ended is None and job.alive


def _start_first(run_id: str) -> str | None:
    """A member's first attempt, unless it was resumed or cancelled before its turn."""
    from cluster.index import Index
    from cluster.runs import save, submit_attempt
    from schemas import load_spec

    index = Index()
    record = index.find(run_id)  # as it is now that no cancel or resume acts on it
    if record.attempts or record.paths.cancel_marker.exists():
        return None
    job_id = submit_attempt(record, load_spec(record.spec_path), index)
    warning = save(record, index, strict=False)
    return job_id + (f" (warning: {warning})" if warning else "")


def _resume(run_id: str) -> str | None:
    """A member's next attempt, unless it was cancelled after the resume was asked for, or resumed. The
    resume removed the member's cancel marker when it queued it here (``sweep_ops``): one there now came
    after, also before this runner started."""
    from cluster.errors import Failure
    from cluster.index import Index
    from cluster.runs import resume

    if Index().find(run_id).paths.cancel_marker.exists():
        return None
    try:
        _, job_id, warning = resume(run_id)
    except Failure as exc:  # it has an attempt queued or running already
        print(f"not resumed {run_id}: {exc.lines[0]}")
        return None
    return None if job_id is None else job_id + (f" (warning: {warning})" if warning else "")


def main(argv: list[str]) -> int:
    from cluster.index import Index
    from cluster.sweep import SWEEP_FILE, SweepRecord

    sweep_dir, resuming = Path(argv[0]), argv[2:] if argv[1:2] == ["--resume"] else None
    sweep = SweepRecord.from_dict(json.loads((sweep_dir / SWEEP_FILE).read_bytes()))
    slots = sweep.max_parallel or len(sweep.members)
    index = Index()
    pending = list(sweep.run_ids if resuming is None else resuming)
    verb, done = ("started" if resuming is None else "resumed"), 0
    while pending:
        busy = sum(running(index.find(run_id)) for run_id in sweep.run_ids)
        while pending and busy < slots:
            run_id = pending.pop(0)
            try:
                with run_lock(index.find(run_id)):
                    job = _start_first(run_id) if resuming is None else _resume(run_id)
            except RunBusy as exc:  # its lock held for long (a pixpro stopped with Ctrl-Z): next poll
                print(f"not yet {run_id}: {exc.lines[0]}")
                pending.insert(0, run_id)
                break
            if job is None:
                continue  # resumed, cancelled or completed before its turn
            print(f"{verb} {run_id} as {job}")
            done += 1
            busy += 1
        time.sleep(POLL_S)
    print(f"{done} member(s) of {sweep.sweep_id} {verb} (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
