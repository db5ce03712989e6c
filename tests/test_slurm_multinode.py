"""How a multi-node job's step and its requeues behave on the real local cluster (two nodes): what
SLURM does with the srun options, exclude lists and cancels that pixpro hands it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.node_task import NodeTask
from cluster.slurm import executor_parameters
from schemas import RunSpec
from tests.support.procs import wait_for
from tests.test_slurm_cluster import (
    TERMINAL,
    _submitted,
    run,
    sacct_lines,
    sbatch,
    wait_finished,
    write_script,
)

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module", autouse=True)
def cancel_ours() -> Iterator[None]:
    """Cancel, by id, every job this module submitted, whatever state a test left it in."""
    before = len(_submitted)
    yield
    ours = _submitted[before:]
    if ours:
        subprocess.run(["scancel", *ours], capture_output=True, timeout=30)


def _spec() -> RunSpec:
    return RunSpec.model_validate(
        {"name": "multi", "data": {"root": "/data"}, "resources": {"nodes": 2, "cpus_per_task": 1}}
    )


@pytest.mark.timeout(240)
def test_a_node_task_that_fails_ends_the_step_on_every_node(shared_dir: Path) -> None:
    """Node 1 fails at once while node 0 would wait (as in torch's 600 s rendezvous join timeout): with
    pixpro's srun options SLURM ends node 0's task too and the job FAILS, instead of holding both
    nodes until the time limit (1 min here: without -K the job ends TIMEOUT)."""
    srun_args = shlex.join(executor_parameters(_spec())["srun_args"])
    script = write_script(
        shared_dir / "bad_exit.sh",
        f"""
        #!/bin/bash
        srun {srun_args} bash -c '[ "$SLURM_NODEID" = 1 ] && exit 1; sleep 600; touch {shared_dir}/held'
        """,
    )
    job = sbatch(
        "-N", "2", "--ntasks-per-node=1", "-t", "1", "-o", f"{shared_dir}/%j.out", str(script), cwd=shared_dir
    )
    lines = wait_finished(job, timeout=200)
    out = (shared_dir / f"{job}.out").read_text()
    assert "task 1: Exited with exit code 1" in out, out  # the step ran; node 1's task failed
    assert lines[-1][1] == "FAILED", (lines, out)
    assert not (shared_dir / "held").exists()


def _task(run_dir: Path) -> NodeTask:
    return NodeTask(
        run_id="r", run_dir=str(run_dir), workdir=str(run_dir), nodes=2, gpus_per_node=0, max_restarts=0,
        signal_name="USR2", signal_lead_s=60,
    )  # fmt: skip


def _exc_nodes(job: str) -> set[str]:
    shown = run("scontrol", "show", "job", job).stdout
    hosts = next(w.split("=", 1)[1] for w in shown.split() if w.startswith("ExcNodeList="))
    return set(run("scontrol", "show", "hostnames", hosts).stdout.split())


@pytest.mark.timeout(60)
def test_a_requeue_that_leaves_a_node_out_keeps_the_jobs_own_exclude_list(shared_dir: Path) -> None:
    """``scontrol update ExcNodeList`` replaces the list: the node task must write the user's own
    ``--exclude`` (node2 here) back beside the node it leaves out (node1), not node1 alone."""
    job = sbatch(
        "--hold", "--exclude=node2", "-t", "1", "-o", f"{shared_dir}/%j.out", "--wrap", "true", cwd=shared_dir
    )
    _task(shared_dir)._exclude(job, ["node1"])
    assert _exc_nodes(job) == {"node1", "node2"}


STOPPED_BY_SIGTERM = """
import signal, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from cluster import node_task

node_task.REQUEUE_SETTLE_S = 1.0
task = node_task.NodeTask(
    run_id="r", run_dir={folder!r}, workdir={folder!r}, nodes=1, gpus_per_node=0, max_restarts=0,
    signal_name="USR2", signal_lead_s=60,
)
ctx = node_task.JobContext.from_slurm_env()


def stopped(signum, frame):  # as __call__ once the launcher exited 75 after the SIGTERM
    Path({folder!r}, "decided").write_text(str(task._requeue_after_stop(ctx)))
    sys.exit(0)


signal.signal(signal.SIGTERM, stopped)
Path({folder!r}, "ready").touch()
time.sleep(300)
"""


@pytest.mark.timeout(120)
def test_a_plain_scancel_is_not_undone_by_the_requeue_after_sigterm(shared_dir: Path) -> None:
    """``scancel JOB`` sends SIGTERM as ``scontrol requeue`` does; node 0 requeues after a SIGTERM unless
    the job was cancelled: it reads that from the accounting (no CANCELLED marker of pixpro's here), so
    the job ends CANCELLED, not REQUEUED, and the run is marked cancelled."""
    script = shared_dir / "stopped.py"
    script.write_text(STOPPED_BY_SIGTERM.format(repo=str(Path(__file__).parents[1]), folder=str(shared_dir)))
    job = sbatch(
        "--requeue", "-t", "2", "-o", f"{shared_dir}/%j.out",
        "--wrap", f"exec {shlex.quote(sys.executable)} {script}", cwd=shared_dir,
    )  # fmt: skip
    wait_for("the job to start", lambda: (shared_dir / "ready").exists(), 60)
    run("scancel", job)
    wait_for("node 0's decision", lambda: (shared_dir / "decided").exists(), 60)

    def first_run() -> tuple[str, str, str] | None:
        lines = sacct_lines(job)
        return lines[0] if lines and lines[0][1] in {*TERMINAL, "REQUEUED"} else None

    ended = wait_for("the first run to end", first_run, 60)
    assert ended[1] == "CANCELLED", (ended, (shared_dir / f"{job}.out").read_text())
    assert (shared_dir / "CANCELLED").exists()  # the run's cancel marker, as pixpro cancel writes it
