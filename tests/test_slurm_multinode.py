"""How a multi-node job's step and its requeues behave on the real local cluster (two nodes): what
SLURM does with the srun options, exclude lists and cancels that pixpro hands it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.slurm import executor_parameters
from schemas import RunSpec
from tests.test_slurm_cluster import _submitted, sbatch, wait_finished, write_script

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module", autouse=True)
def cancel_ours() -> Iterator[None]:
    """Cancel, by id, every job this module submitted, whatever state a test left it in."""
    before = len(_submitted)
    yield
    ours = _submitted[before:]
    if ours:
        subprocess.run(["scancel", *ours], capture_output=True, timeout=30)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every node sees (one machine: /tmp is shared)."""
    path = Path("/tmp/pixpro-slurm-tests") / uuid.uuid4().hex[:10]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
