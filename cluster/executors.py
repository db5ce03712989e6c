"""Where attempts run: the executor interface and its two implementations, SLURM and local.

submitit's shape is the model: an executor checks what it can give, describes what it would run and
submits an attempt; the attempt's :class:`Job` handle knows its state, its logs and how to cancel itself.
Adding an executor is one executor class and one handle class. Nothing outside this module asks which
executor a run uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cluster import evals, local, nodes, slurm
from cluster.attempts import AttemptState, local_state, slurm_state
from cluster.errors import Failure, UsageError
from cluster.preflight import check_local_gpus
from cluster.record import RunRecord, read_local
from cluster.torchrun import LOCAL_ENDPOINT
from schemas.contract import SUBMITIT_DIR, RunPaths

if TYPE_CHECKING:
    from cluster.index import Index
    from schemas import RunSpec
    from schemas.contract import EvalRequest

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
    unchecked: str | None = None  # why the plan was not checked against a cluster (one line)


class Job(Protocol):
    """One attempt, as submitit's job handle: its id, its state, where its logs are, how to stop it."""

    job_id: str

    def state(self, trainer: dict[str, Any] | None = None) -> AttemptState:
        """Its state from the executor's answer and the trainer's ``status.json`` (as written)."""

    def log_files(self) -> list[Path]:
        """The files its output goes to, one per node."""

    def cancel(self) -> None:
        """Ask it to checkpoint and stop."""

    def settle_s(self, state: AttemptState) -> float:
        """How long an ended state must hold before ``--follow`` believes it."""


class Executor(Protocol):
    """Where attempts run: checks a spec, describes and submits attempts, hands out their :class:`Job`."""

    name: str

    def check(self, spec: RunSpec) -> None:
        """Refuse (UsageError, exit 2) what this executor can never give the run."""

    def describe(
        self, spec: RunSpec, run_dir: Path, check_cluster: bool, dry_run: bool = False
    ) -> Description:
        """The plan of an attempt; with ``check_cluster`` also checked against the cluster. A dry run
        whose cluster does not answer is described unchecked (``Description.unchecked`` says why)."""

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        """Before a resume: can the cluster still run it?"""

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> Job:
        """Queue one attempt."""

    def submit_sweep(
        self, records: list[RunRecord], spec: RunSpec, index: Index, sweep_dir: Path, max_parallel: int | None
    ) -> list[str | None]:
        """Queue the first attempt of every member of a sweep (their resources are ``spec``'s), at most
        ``max_parallel`` running at once; a member's job id, or None for one started later."""

    def submit_eval(self, record: RunRecord, spec: RunSpec, request: EvalRequest) -> str:
        """Queue an evaluation of the run (:mod:`cluster.evals`); ``spec`` holds its resources."""

    def eval_log(self, record: RunRecord, request: EvalRequest) -> Path:
        """Where the evaluation job's output goes."""

    def eval_waits_on(self, request: EvalRequest, job_id: str) -> None:
        """A pending evaluation job waits for ``job_id`` from now on (after ``pixpro resume``)."""

    def job(self, record: RunRecord, job_id: str) -> Job:
        """The handle of one attempt of the run (asks nothing until its state is wanted)."""

    def jobs(self, records: list[RunRecord], timeout_s: float | None = None) -> Jobs:
        """The handles of every run's attempts and the states of its evaluation jobs, asked in one batch
        for all runs (``pixpro status``), and one-line warnings; ``timeout_s`` bounds the wait for the
        cluster's answer (None: the executor's own bound)."""


@dataclass
class Jobs:
    """What :meth:`Executor.jobs` found for a list of runs."""

    attempts: dict[str, list[Job]]  # run_id -> handles of its attempts, oldest first
    evals: dict[str, list[tuple[EvalRequest, AttemptState]]]  # run_id -> its evaluations, their jobs' states
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ SLURM
@dataclass
class SlurmJobHandle:
    """A SLURM job: state from squeue + sacct, logs in submitit's folder, scancel to stop it."""

    record: RunRecord
    job_id: str
    answer: slurm.SlurmJob | None = None  # what squeue + sacct said, when asked in a batch

    def state(self, trainer: dict[str, Any] | None = None) -> AttemptState:
        answer = self.answer or slurm.query([self.job_id], self.record.submitted)[0][self.job_id]
        recent = time.time() - self.record.submitted.get(self.job_id, 0.0) < RECENT_S
        return slurm_state(answer, trainer, self.job_id in self.record.cancelled, recent)

    def log_files(self) -> list[Path]:
        folder = self.record.paths.submitit
        return [folder / f"{self.job_id}_{node}_log.out" for node in range(self.record.nodes)]

    def cancel(self) -> None:
        slurm.scancel([self.job_id])

    def settle_s(self, state: AttemptState) -> float:
        # a preempted job is requeued under the same id a moment later and its log goes on
        return 30.0 if state.state == "PREEMPTED" else 4.0


class SlurmExecutor:
    """sbatch through submitit, state from squeue + sacct (one call each for any number of jobs)."""

    name = "slurm"

    def check(self, spec: RunSpec) -> None:
        return None  # resources are checked against sinfo in describe()

    def describe(
        self, spec: RunSpec, run_dir: Path, check_cluster: bool, dry_run: bool = False
    ) -> Description:
        sbatch = slurm.available()
        check_cluster = check_cluster and sbatch
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
        if not check_cluster:
            why = "the cluster was not asked" if sbatch else "sbatch is not on PATH"
            d.unchecked = f"{why}: nothing was checked against a cluster"
            return d
        try:
            d.estimate = slurm.preflight(spec, script, exclude)
        except Failure as exc:  # the cluster did not answer; a refusal (UsageError) stands
            if not dry_run:
                raise
            d.unchecked = f"not checked against the cluster: {exc.lines[0]}"
            return d
        d.cluster_checked = True
        return d

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        self.describe(spec, run_dir, check_cluster=True)

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> Job:
        from cluster.node_task import NodeTask

        params = slurm.executor_parameters(spec, slurm.node_cpus(spec), nodes.excluded(record))
        return self.job(record, slurm.submit(NodeTask.for_run(record), params, record.paths.submitit, spec))

    def submit_sweep(
        self, records: list[RunRecord], spec: RunSpec, index: Index, sweep_dir: Path, max_parallel: int | None
    ) -> list[str | None]:
        """One job array in the sweep's submitit folder; each member's submitit folder links to it, so its
        logs are where a single run's are (``<array>_<index>_<node>_log.out``). Also the next attempts of
        members that ``pixpro resume SWEEP-ID`` queues together, which leave out the same nodes (an
        array has one node list)."""
        from cluster.node_task import NodeTask

        folder = sweep_dir / SUBMITIT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for record in records:
            if not (record.paths.submitit.is_symlink() or record.paths.submitit.exists()):
                record.paths.submitit.symlink_to(folder, target_is_directory=True)
        params = slurm.executor_parameters(spec, slurm.node_cpus(spec), nodes.excluded(records[0]))
        tasks = [NodeTask.for_run(r) for r in records]
        return list(slurm.submit_array(tasks, params, folder, spec, max_parallel))

    def submit_eval(self, record: RunRecord, spec: RunSpec, request: EvalRequest) -> str:
        """One node, ``afterok`` on the run's job with ``--after``; logs in the evaluation's folder."""
        from cluster.eval_runner import EvalTask

        params = slurm.executor_parameters(spec, slurm.node_cpus(spec), nodes.excluded(record))
        params["job_name"] = f"{spec.name}-eval-{request.task}"
        after = evals.after_job(request)
        if after:
            params["additional_parameters"]["dependency"] = f"afterok:{after}"
        task = EvalTask(record.run_dir, request.eval_id, record.workdir)
        return slurm.submit(task, params, record.paths.eval(request.eval_id).submitit, spec)

    def eval_log(self, record: RunRecord, request: EvalRequest) -> Path:
        return record.paths.eval(request.eval_id).submitit / f"{request.job_id}_0_log.out"

    def eval_waits_on(self, request: EvalRequest, job_id: str) -> None:
        if request.job_id:  # SLURM takes a new dependency while the job is pending
            slurm.set_dependency(request.job_id, f"afterok:{job_id}")

    def job(self, record: RunRecord, job_id: str) -> Job:
        return SlurmJobHandle(record, job_id)

    def jobs(self, records: list[RunRecord], timeout_s: float | None = None) -> Jobs:
        """Attempts and evaluation jobs of every run: one ``squeue`` and one ``sacct`` for all."""
        asked = {r.run_id: evals.requests(r) for r in records}
        queued = {e.job_id: e.submitted for es in asked.values() for e in es if e.job_id}
        submitted = {j: t for r in records for j, t in r.submitted.items()} | queued
        ids = [j for r in records for j in r.attempts] + list(queued)
        answers, warnings = slurm.query(ids, submitted, timeout_s) if ids else ({}, [])
        now = time.time()

        def eval_job(e: EvalRequest) -> AttemptState:
            if e.job_id is None:
                return AttemptState("UNKNOWN", "not queued")
            return slurm_state(answers[e.job_id], None, False, now - e.submitted < RECENT_S)

        return Jobs(
            {r.run_id: [SlurmJobHandle(r, j, answers[j]) for j in r.attempts] for r in records},
            {run_id: [(e, eval_job(e)) for e in es] for run_id, es in asked.items()},
            warnings,
        )


# ------------------------------------------------------------------------------------------ local
@dataclass
class LocalJobHandle:
    """A local attempt: state from its runner's record, one log file, SIGTERM to stop it."""

    record: RunRecord
    job_id: str

    def state(self, trainer: dict[str, Any] | None = None) -> AttemptState:
        job = local.read_job(Path(self.record.run_dir), self.job_id)
        return local_state(job, trainer, self.job_id in self.record.cancelled)

    def log_files(self) -> list[Path]:
        return [local.log_path(Path(self.record.run_dir), self.job_id)]

    def cancel(self) -> None:
        job = local.read_job(Path(self.record.run_dir), self.job_id)
        if job is not None:
            local.stop(job)

    def settle_s(self, state: AttemptState) -> float:
        return 0.0


def _run_ended_unfinished(record: RunRecord) -> bool:
    """The run's latest attempt ended otherwise than completed (or it was cancelled before its first):
    an evaluation after it waits for a ``pixpro resume``, as SLURM's afterok would."""
    if record.latest_job is None:
        return record.paths.cancel_marker.exists()
    st = local_state(local.read_job(Path(record.run_dir), record.latest_job), None, False)
    return not st.active and st.state != "COMPLETED"


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

    def describe(
        self, spec: RunSpec, run_dir: Path, check_cluster: bool, dry_run: bool = False
    ) -> Description:
        return Description(LOCAL_ENDPOINT, "local-<n>", "local-<n>", is_host="1")

    def recheck(self, spec: RunSpec, run_dir: Path) -> None:
        self.check(spec)

    def submit(self, record: RunRecord, spec: RunSpec, index: Index) -> Job:
        job_id = index.next_local_job_id()
        local.spawn(Path(record.run_dir), job_id, Path(record.workdir))
        return self.job(record, job_id)

    def submit_sweep(
        self, records: list[RunRecord], spec: RunSpec, index: Index, sweep_dir: Path, max_parallel: int | None
    ) -> list[str | None]:
        """Every member now, or a detached sweep runner that starts them as slots free up."""
        if max_parallel is None or max_parallel >= len(records):
            return [self.submit(r, spec, index).job_id for r in records]
        from cluster.sweep_runner import spawn_sweep_runner

        spawn_sweep_runner(sweep_dir)
        return [None] * len(records)

    def submit_eval(self, record: RunRecord, spec: RunSpec, request: EvalRequest) -> str:
        """A detached runner (:mod:`cluster.eval_runner`) that waits for the run with ``--after``."""
        from cluster.index import Index

        self.check(spec)
        job_id = "eval-" + Index().next_local_job_id().removeprefix("local-")  # unique, as local-<n>
        run_dir, workdir = Path(record.run_dir), Path(record.workdir)
        local.spawn(run_dir, job_id, workdir, "cluster.eval_runner", request.eval_id)
        return job_id

    def eval_log(self, record: RunRecord, request: EvalRequest) -> Path:
        return local.log_path(Path(record.run_dir), str(request.job_id))

    def eval_waits_on(self, request: EvalRequest, job_id: str) -> None:
        return None  # the local runner waits for whatever attempt is the run's latest

    def job(self, record: RunRecord, job_id: str) -> Job:
        return LocalJobHandle(record, job_id)

    def jobs(self, records: list[RunRecord], timeout_s: float | None = None) -> Jobs:
        def eval_job(r: RunRecord, e: EvalRequest) -> AttemptState:
            if e.job_id is None:
                return AttemptState("UNKNOWN", "not queued")
            paths = r.paths.eval(e.eval_id)
            st = local_state(local.read_job(Path(r.run_dir), e.job_id), None, paths.cancel_marker.exists())
            if st.state == "RUNNING" and evals.waits_on(e) and not paths.result.exists():  # as afterok
                never = _run_ended_unfinished(r)
                return AttemptState("PENDING", "DependencyNeverSatisfied" if never else "Dependency")
            return st

        return Jobs(
            {r.run_id: [self.job(r, j) for j in r.attempts] for r in records},
            {r.run_id: [(e, eval_job(r, e)) for e in evals.requests(r)] for r in records},
        )


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
