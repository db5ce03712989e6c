"""Where attempts run: the executor interface and its two implementations, SLURM and local.

submitit's few verbs are the model: check what the executor can give, describe what it would run, submit
an attempt, cancel attempts, read their states and say where their logs are. Nothing outside this module
asks which executor a run uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cluster import local, nodes, slurm
from cluster.attempts import AttemptState, local_state, slurm_state
from cluster.errors import UsageError
from cluster.node_task import NodeTask
from cluster.preflight import check_local_gpus
from cluster.record import RunRecord, read_local
from cluster.torchrun import LOCAL_ENDPOINT
from schemas.contract import RunPaths

if TYPE_CHECKING:
    from cluster.index import Index
    from schemas import RunSpec

RECENT_S = 120.0  # a job this young may not be visible to squeue/sacct yet: PENDING, not UNKNOWN


@dataclass
class Description:
    """What a submission would run, computed without writing anything (``--dry-run`` prints it)."""

    endpoint: str  # the rendezvous endpoint of the torchrun command (placeholders on SLURM)
    rdzv_id: str
    attempt: str  # PIXPRO_ATTEMPT as the node task sets it
    params: dict[str, Any] = field(default_factory=dict)
    script: str | None = None  # sbatch script
    estimate: str | None = None  # sbatch --test-only
    cluster_checked: bool = False
    notes: list[str] = field(default_factory=list)
    is_host: str | None = None  # torchrun's rdzv-conf is_host (a placeholder on SLURM: 1 on node 0)


class Executor(Protocol):
    name: str

    def check(self, spec: RunSpec) -> None:
        """Refuse (UsageError, exit 2) what this executor can never give the run."""

    def describe(self, spec: RunSpec, run_dir: Path, check_cluster: bool) -> Description:
        """The plan of an attempt; with ``check_cluster`` also checked against the cluster."""

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        """Before a resume: can the cluster still run it?"""

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> str:
        """Queue one attempt; returns its job id."""

    def cancel(self, record: RunRecord, job_ids: list[str]) -> None:
        """Ask these attempts to checkpoint and stop."""

    def states(
        self, records: list[RunRecord], trainers: dict[str, dict[str, Any] | None]
    ) -> tuple[dict[str, dict[str, AttemptState]], list[str]]:
        """{run_id: {job_id: state}} of these runs' attempts, and one-line warnings."""

    def log_files(self, record: RunRecord, job_id: str) -> list[Path]:
        """The files an attempt's output goes to, one per node."""

    def settle_s(self, state: AttemptState) -> float:
        """How long an ended state must hold before ``--follow`` believes it."""


class SlurmExecutor:
    """sbatch through submitit, state from squeue + sacct (one call each for any number of jobs)."""

    name = "slurm"

    def check(self, spec: RunSpec) -> None:
        return None  # resources are checked against sinfo in describe()

    def describe(self, spec: RunSpec, run_dir: Path, check_cluster: bool) -> Description:
        check_cluster = check_cluster and slurm.available()
        exclude = _left_out(run_dir)
        params = slurm.executor_parameters(spec, slurm.node_cpus(spec) if check_cluster else None, exclude)
        script = slurm.render_script(params, RunPaths(run_dir).submitit)
        attempt = "$SLURM_JOB_ID.$SLURM_RESTART_COUNT"
        if spec.resources.nodes == 1:  # as JobContext.from_slurm_env: the store takes a free port
            d = Description(LOCAL_ENDPOINT, "$SLURM_JOB_ID", attempt, params, script, is_host="1")
        else:
            note = (
                "# FIRST_HOST=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1); "
                "PORT derived from the job id and restart count; IS_HOST=1 on node 0, 0 on the others"
            )
            d = Description(
                "$FIRST_HOST:$PORT",
                "$SLURM_JOB_ID",
                attempt,
                params,
                script,
                notes=[note],
                is_host="$IS_HOST",
            )
        if check_cluster:
            d.estimate = slurm.preflight(spec, script, exclude)
            d.cluster_checked = True
        return d

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        self.describe(spec, run_dir, check_cluster=True)

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> str:
        params = slurm.executor_parameters(spec, slurm.node_cpus(spec), nodes.excluded(record))
        folder = record.paths.submitit
        return slurm.submit(NodeTask.for_run(record), params, folder, spec)

    def cancel(self, record: RunRecord, job_ids: list[str]) -> None:
        slurm.scancel(job_ids)

    def states(
        self, records: list[RunRecord], trainers: dict[str, dict[str, Any] | None]
    ) -> tuple[dict[str, dict[str, AttemptState]], list[str]]:
        ids = [j for r in records for j in r.attempts]
        submitted = {j: t for r in records for j, t in r.submitted.items()}
        jobs, warnings = slurm.query(ids, submitted) if ids else ({}, [])
        now = time.time()
        out = {}
        for rec in records:
            out[rec.run_id] = {
                j: slurm_state(
                    jobs[j],
                    trainers.get(rec.run_id),
                    j in rec.cancelled,
                    now - rec.submitted.get(j, 0.0) < RECENT_S,
                )
                for j in rec.attempts
            }
        return out, warnings

    def log_files(self, record: RunRecord, job_id: str) -> list[Path]:
        folder = record.paths.submitit
        return [folder / f"{job_id}_{node}_log.out" for node in range(record.nodes)]

    def settle_s(self, state: AttemptState) -> float:
        # a preempted job is requeued under the same id a moment later and its log goes on
        return 30.0 if state.state == "PREEMPTED" else 4.0


def _left_out(run_dir: Path) -> list[str]:
    """The nodes an existing run leaves out (a new run's folder does not exist yet)."""
    return nodes.excluded(read_local(run_dir)) if RunPaths(run_dir).record.exists() else []


class LocalExecutor:
    """One detached process per attempt on this machine (:mod:`cluster.local`), one node."""

    name = "local"

    def check(self, spec: RunSpec) -> None:
        if spec.resources.nodes > 1:
            raise UsageError(
                f"--executor local runs one node; this run asks for {spec.resources.nodes} (--nodes)"
            )
        check_local_gpus(spec.resources.gpus_per_node)

    def describe(self, spec: RunSpec, run_dir: Path, check_cluster: bool) -> Description:
        return Description(LOCAL_ENDPOINT, "local-<n>", "local-<n>", is_host="1")

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        self.check(spec)

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> str:
        job_id = index.next_local_job_id()
        local.spawn(Path(record.run_dir), job_id, Path(record.workdir))
        return job_id

    def cancel(self, record: RunRecord, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = local.read_job(Path(record.run_dir), job_id)
            if job is not None:
                local.stop(job)

    def states(
        self, records: list[RunRecord], trainers: dict[str, dict[str, Any] | None]
    ) -> tuple[dict[str, dict[str, AttemptState]], list[str]]:
        out = {}
        for rec in records:
            out[rec.run_id] = {
                j: local_state(
                    local.read_job(Path(rec.run_dir), j), trainers.get(rec.run_id), j in rec.cancelled
                )
                for j in rec.attempts
            }
        return out, []

    def log_files(self, record: RunRecord, job_id: str) -> list[Path]:
        return [local.log_path(Path(record.run_dir), job_id)]

    def settle_s(self, state: AttemptState) -> float:
        return 0.0


_EXECUTORS: dict[str, Executor] = {"slurm": SlurmExecutor(), "local": LocalExecutor()}
NAMES = ("auto", *_EXECUTORS)


def executor(name: str) -> Executor:
    """The executor a run record names."""
    return _EXECUTORS[name]


def choose(name: str, dry_run: bool = False) -> Executor:
    """``auto`` is SLURM when sbatch is on PATH, else local; a dry run previews SLURM without sbatch (the
    machine where specs are written often has none), saying that nothing was checked against a cluster."""
    if name not in NAMES:
        raise UsageError(f"--executor must be one of {', '.join(NAMES)} (got {name!r})")
    if name == "auto":
        return _EXECUTORS["slurm" if slurm.available() or dry_run else "local"]
    if name == "slurm" and not slurm.available() and not dry_run:
        raise UsageError("--executor slurm: sbatch is not on PATH (use --executor local on this machine)")
    return _EXECUTORS[name]
