"""sbatch parameters of a run, without a cluster: the CPU request that keeps every rank and worker fed."""

from __future__ import annotations

from pathlib import Path

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
