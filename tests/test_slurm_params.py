"""sbatch parameters of a run, without a cluster: the CPU request that keeps every rank and worker fed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.slurm import cpus_per_task, default_cpus, executor_parameters, render_script
from schemas import RunSpec


def _spec(gpus: int, workers: int, cpus: int | None = None) -> RunSpec:
    return RunSpec.model_validate(
        {
            "name": "cpus",
            "data": {"root": "/data", "num_workers": workers},
            "resources": {"gpus_per_node": gpus, "cpus_per_task": cpus},
        }
    )


def test_default_cpu_request_is_one_per_rank_and_per_worker_capped_at_the_node() -> None:
    assert default_cpus(_spec(8, 8)) == 72
    assert default_cpus(_spec(0, 3)) == 4  # one CPU rank with its three workers
    assert cpus_per_task(_spec(8, 8)) == 72  # node size unknown (no sinfo): uncapped
    assert cpus_per_task(_spec(8, 8), node_cpus=48) == 48
    assert cpus_per_task(_spec(2, 1), node_cpus=48) == 4
    assert cpus_per_task(_spec(8, 8, cpus=20), node_cpus=48) == 20  # an explicit request wins


def test_the_request_reaches_sbatch_and_the_srun_step() -> None:
    script = render_script(executor_parameters(_spec(2, 3), node_cpus=6), Path("/tmp/submitit"))
    assert "#SBATCH --cpus-per-task=6" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=6" in srun  # srun does not inherit it from the job since SLURM 22.05


PINNED_SCRIPT = """\
#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --gpus-per-node=2
#SBATCH --job-name=pin
#SBATCH --mem=64GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/r1/submitit/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --time=90
#SBATCH --wckey=submitit

# setup
export SUBMITIT_PREEMPT_SIGNAL=USR1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/r1/submitit/%j_%t_log.out --cpus-per-task=8 \
/venv/bin/python -u -m submitit.core._submit /runs/r1/submitit
"""


def test_submitit_renders_the_sbatch_script_exactly_as_pinned() -> None:
    """``render_script`` calls submitit's private ``_make_sbatch_string`` (submitit is pinned for it): an
    upgrade that renders differently, or names the per-node logs differently (``pixpro logs`` reads
    ``<job>_<node>_log.out``), fails here rather than on a cluster."""
    params = {
        "job_name": "pin",
        "time": 90,
        "nodes": 2,
        "ntasks_per_node": 1,
        "signal_delay_s": 120,
        "stderr_to_stdout": True,
        "cpus_per_task": 8,
        "srun_args": ["--cpus-per-task=8"],
        "setup": ["export SUBMITIT_PREEMPT_SIGNAL=USR1"],
        "additional_parameters": {"requeue": True, "signal": "USR1@120", "exclusive": True},
        "gpus_per_node": 2,
        "mem": "64GB",
        "partition": "gpu",
    }
    script = render_script(params, Path("/runs/r1/submitit"), python="/venv/bin/python")
    assert script == PINNED_SCRIPT


def test_a_failed_node_task_ends_the_step() -> None:
    """srun -K: one failed node task ends every node's (tests/test_slurm_multinode.py: SLURM's side)."""
    script = render_script(executor_parameters(_spec(2, 3), node_cpus=6), Path("/tmp/submitit"))
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun


def test_time_limits_requeue_a_run_without_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit ends a job at its (max_num_timeout + 1)-th time-limit signal (default 3): the pickle it
    submits carries that countdown, which pixpro sets beyond any run's length."""
    from submitit import SlurmExecutor
    from submitit.core.utils import DelayedSubmission
    from submitit.slurm.slurm import SlurmJob

    from cluster.slurm import submit

    monkeypatch.setattr(SlurmExecutor, "_submit_command", lambda self, command: SlurmJob(self.folder, "4242"))
    assert submit(print, executor_parameters(_spec(0, 0)), tmp_path, _spec(0, 0)) == "4242"
    delayed = DelayedSubmission.load(tmp_path / "4242_submitted.pkl")
    assert delayed._timeout_countdown >= 10**6  # a time limit of a minute: two years of segments
