"""Creating, resubmitting and cancelling runs: the run folder, its records, and the executor calls.

A run is created only after every check passed (spec, cluster resources, checkpoint folder free), so
a refused ``submit`` leaves nothing behind; a submission that fails after that is rolled back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cluster import evals
from cluster.attempts import AttemptState
from cluster.errors import Failure, Interrupted, UsageError
from cluster.executors import Description, choose, executor
from cluster.home import new_run_id, run_dir
from cluster.index import Index
from cluster.preflight import run_preflight
from cluster.progress import open_run_store
from cluster.record import RECORD_FILE, RunRecord, atomic_write, run_lock, write_local
from cluster.specs import resolve_spec, spec_json
from cluster.torchrun import NodeCommand, Placement, node_command
from launch.store.format import absolute_url
from schemas import RunSpec, load_spec, spec_hash
from schemas.contract import RunPaths, one_line


def pixpro_version() -> str:
    try:
        return version("pixpro")
    except PackageNotFoundError:
        return "0+unknown"


# ------------------------------------------------------------------------------------------ specs
def with_checkpoint_url(spec: RunSpec, rdir: Path, cwd: Path) -> RunSpec:
    """Every attempt must use the same folder: fill in the default and make relative paths absolute."""
    url = spec.checkpoint.url
    url = RunPaths(rdir).store_url(None) if url is None else absolute_url(url, cwd)
    return spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"url": url})})


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Submission:
    """Everything a submission will do, computed without writing anything (``--dry-run`` prints it)."""

    spec: RunSpec
    run_id: str
    run_dir: Path
    executor: str
    workdir: Path
    description: Description
    preflight: dict[str, Any] | None = None

    @property
    def script(self) -> str | None:
        return self.description.script

    @property
    def cluster_checked(self) -> bool:
        return self.description.cluster_checked

    def node_command(self) -> NodeCommand:
        """What each node runs, from the same builder as the node task, with the executor's placeholders."""
        res, d = self.spec.resources, self.description
        return node_command(
            self.run_dir,
            Placement(d.rdzv_id, d.endpoint, d.is_host or "1", d.attempt),
            nodes=res.nodes,
            gpus_per_node=res.gpus_per_node,
            max_restarts=res.max_restarts,
            signal=res.signal,
        )

    def torchrun_command(self) -> list[str]:
        return self.node_command().argv

    def record(self) -> RunRecord:
        """The run record a submission of this plan writes (run.json), before any attempt."""
        return RunRecord(
            run_id=self.run_id,
            name=self.spec.name,
            spec_hash=spec_hash(self.spec),
            created=time.time(),
            executor=self.executor,
            run_dir=str(self.run_dir),
            workdir=str(self.workdir),
            checkpoint_url=self.spec.checkpoint.url or "",
            storage_options=dict(self.spec.checkpoint.storage_options),
            resources=self.spec.resources.model_dump(mode="json"),
            version=pixpro_version(),
        )

    def dry_run_text(self) -> str:
        d = self.description
        out = ["# resolved spec", spec_json(self.spec).rstrip()]
        if d.script is not None:
            out += ["", "# sbatch script", d.script.rstrip()]
            if d.estimate:
                out += ["", f"# sbatch --test-only: {d.estimate}"]
            if d.unchecked:
                out += ["", f"# {d.unchecked}"]
        out += ["", f"# torchrun command (per node; executor {self.executor}, cwd {self.workdir})", *d.notes]
        out.append(self.node_command().shell())
        out += ["", "# preflight: not run by --dry-run (pixpro validate --deep SPEC runs it; submit does)"]
        return "\n".join(out) + "\n"


def plan_submission(
    spec_path: Path,
    *,
    nodes: int | None,
    gpus: int | None,
    executor: str,
    check_cluster: bool = True,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    preflight: bool = True,
    check: Callable[[RunSpec], object] | None = None,
    free_folder: bool = True,
) -> Submission:
    """Every check before anything is written: spec, executor resources (local: visible CUDA devices;
    SLURM: sinfo + ``sbatch --test-only``), the caller's ``check`` of the resolved spec (its other
    options), a checkpoint folder that holds another run (``free_folder``; a sweep moves its members
    below a shared one later), then the preflight child (skipped by ``--dry-run`` and ``--no-preflight``):
    a usage error never waits for the preflight's seconds. A dry run without sbatch, or whose cluster
    does not answer, renders the SLURM plan unchecked and says why."""
    spec = resolve_spec(spec_path, nodes, gpus, overrides)
    ex = choose(executor, dry_run=dry_run)
    ex.check(spec)
    refused: UsageError | None = None
    if check is not None:
        try:
            check(spec)
        except UsageError as exc:  # said together with what the cluster says of the spec: one round
            refused = exc
    run_id = new_run_id(spec.name)
    rdir = run_dir(run_id)
    cwd = Path.cwd()
    spec = with_checkpoint_url(spec, rdir, cwd)
    try:
        described = ex.describe(spec, rdir, check_cluster, dry_run)
    except UsageError as exc:
        raise UsageError([*(refused.lines if refused else []), *exc.lines]) from None
    if refused is not None:
        raise refused
    plan = Submission(spec, run_id, rdir, ex.name, cwd, described)
    if free_folder and not dry_run:  # checked again by create_run, just before the run is written
        check_checkpoint_folder_free(spec)
    if preflight and not dry_run:
        plan.preflight = run_preflight(plan.spec)
    return plan


# ------------------------------------------------------------------------------------------ records
def save(record: RunRecord, index: Index, *, strict: bool = True) -> str | None:
    """run.json in the run folder and beside the checkpoints, and the index entry.

    The copy beside the checkpoints may fail (store unreachable): ``strict`` raises, otherwise the
    problem comes back as a warning line (the local record and the index are already written)."""
    write_local(record)
    index.put(record)
    try:
        open_run_store(record.checkpoint_url, record.storage_options).put_aux(
            RECORD_FILE, record.to_json().encode()
        )
    except Exception as exc:
        problem = f"could not write {RECORD_FILE} to {record.checkpoint_url}: {_short(exc)}"
        if strict:
            raise Failure(problem) from None
        return problem
    return None


def _short(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


def check_checkpoint_folder_free(spec: RunSpec) -> None:
    """A usage error when ``checkpoint.url`` already holds a run (its record or a committed step)."""
    url, options = spec.checkpoint.url or "", spec.checkpoint.storage_options
    try:
        store = open_run_store(url, options)
        taken = store.read_aux(RECORD_FILE)
        has_latest = store.latest() is not None
    except Exception as exc:
        raise Failure(f"cannot reach the checkpoint folder {url}: {_short(exc)}") from None
    if taken is not None or has_latest:
        owner = ""
        with contextlib.suppress(ValueError):
            owner = json.loads(taken or b"{}").get("run_id", "")
        hint = f"resume it with: pixpro resume {owner}" if owner else "choose another checkpoint.url"
        raise UsageError(f"checkpoint.url {url} already holds run {owner or '(unknown)'}: {hint}")


def create_run(plan: Submission) -> RunRecord:
    check_checkpoint_folder_free(plan.spec)
    plan.run_dir.mkdir(parents=True, exist_ok=False)
    paths = RunPaths(plan.run_dir)
    atomic_write(paths.spec, spec_json(plan.spec).encode())
    if plan.script is not None:
        atomic_write(paths.sbatch, plan.script.encode())
    return plan.record()


def rollback(record: RunRecord, index: Index) -> None:
    index.remove(record.run_id)
    with contextlib.suppress(Exception):
        open_run_store(record.checkpoint_url, record.storage_options).delete_aux(RECORD_FILE)
    shutil.rmtree(record.run_dir, ignore_errors=True)


def submit_attempt(record: RunRecord, spec: RunSpec, index: Index) -> str:
    """Queue one more attempt of the run; returns its job id."""
    job_id = executor(record.executor).submit(record, spec, index).job_id
    add_attempt(record, job_id, time.time())
    return job_id


def add_attempt(record: RunRecord, job_id: str, submitted: float) -> None:
    record.attempts.append(job_id)
    record.submitted[job_id] = submitted


def resumed(record: RunRecord, job_id: str, index: Index) -> str | None:
    """After a resume queued ``job_id``: the record saved, and the evaluations waiting on the run moved
    onto it; a warning, never a failure (the attempt is queued already)."""
    warning = save(record, index, strict=False)
    try:
        evals.repoint(record, job_id)
    except Failure as exc:  # an evaluation left waiting is a warning
        warning = f"an evaluation still waits on the earlier attempt: {exc.lines[0]}"
    return warning


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[Callable[[], bool]]:
    """Ctrl-C held back until the block ends (in the main thread); yields whether one came. Between
    queueing a job and recording it, an interrupt would leave a job that no run knows."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,
    ):  # no handler can be set here, or Ctrl-C is ignored anyway (nohup, a background job)
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)


def submit(plan: Submission) -> tuple[RunRecord, str, str | None]:
    """Create the run and queue its first attempt: (record, job id, warning or None). The run's lock is
    held from before the index knows the run until its attempt is recorded, so a ``pixpro cancel`` of it
    acts on the queued job; Ctrl-C in between is answered once the job is recorded."""
    index = Index()
    record = create_run(plan)
    with run_lock(record), interrupts_deferred() as interrupted:
        try:
            save(record, index)  # first: the local runner reads run.json; and proves the store is writable
            job_id = submit_attempt(record, plan.spec, index)
        except BaseException:
            rollback(record, index)
            raise
        warning = save(record, index, strict=False)  # queued already: never fail from here
    if interrupted():
        raise Interrupted(
            f"interrupted: run {record.run_id} was queued as job {job_id} first "
            f"(pixpro cancel {record.run_id} stops it)"
        )
    return record, job_id, warning


# ------------------------------------------------------------------------------------------ resume / cancel
def refuse_unanswered(records: list[RunRecord], states: dict[str, dict[str, AttemptState]]) -> None:
    """A run whose latest attempt SLURM did not answer for is not resumed: UNKNOWN is not "ended", it may
    still be queued or running, and a second attempt beside it would train the run twice (exit 1;
    ``pixpro status`` says when SLURM answers again)."""
    from cluster.status import run_state

    problems = []
    for record in records:
        latest = record.latest_job
        state = states[record.run_id].get(latest) if latest else None
        if state is None or not state.unanswered:  # UNKNOWN after SLURM answered: it forgot the job
            continue
        if run_state(record, states[record.run_id]).state == "COMPLETED":
            continue
        problems.append(
            f"run {record.run_id}: attempt {latest} is {state.label()}: it may still be queued or running; "
            "resume when SLURM answers"
        )
    if problems:
        raise Failure(problems)


def resume(ident: str, include_nodes: list[str] | None = None) -> tuple[RunRecord, str | None, str | None]:
    """Queue the next attempt, leaving out the nodes that failed the run twice, unless forgiven here. A
    completed run queues nothing (job id None): its attempt would load the last step and stop, after
    waiting in the queue for an allocation."""
    from cluster import nodes
    from cluster.status import attempt_states, read_all_progress, run_state

    index = Index()
    with run_lock(index.find(ident)):
        record = index.find(ident)  # as it is now that no other resume or cancel acts on it
        states, _ = attempt_states([record], read_all_progress([record]))
        refuse_unanswered([record], states)
        active = [(j, s) for j, s in states[record.run_id].items() if s.active]
        if active:
            job, st = active[-1]
            raise Failure(
                f"run {record.run_id} still has attempt {job} {st.state}: wait, or pixpro cancel {job} first"
            )
        if run_state(record, states[record.run_id]).state == "COMPLETED":
            return record, None, None
        if include_nodes:
            nodes.include(record, include_nodes)
            write_local(record)  # recheck reads the run folder's record
        spec = load_spec(record.spec_path)
        executor(record.executor).recheck(spec, Path(record.run_dir))
        record.paths.cancel_marker.unlink(missing_ok=True)
        job_id = submit_attempt(record, spec, index)
        return record, job_id, resumed(record, job_id, index)


RESUMABLE = ("PREEMPTED", "TIMEOUT")
"""An attempt's ended states that ``pixpro resume`` continues: ``cancel`` marks such an attempt."""


def cancel(ident: str) -> tuple[RunRecord, list[str], str | None]:
    """Stop every attempt still queued or running and mark them cancelled; returns those job ids."""
    from cluster.status import attempt_states, read_all_progress

    index = Index()
    with run_lock(index.find(ident)):
        record = index.find(ident)  # as it is now that no resume acts on it
        states, _ = attempt_states([record], read_all_progress([record]))
        unknown = [j for j, s in states[record.run_id].items() if s.unanswered]
        if unknown:  # it may be running: marking it cancelled would be a claim nobody checked
            why = states[record.run_id][unknown[-1]].reason
            raise Failure(
                f"run {record.run_id}: the state of job(s) {', '.join(unknown)} is unknown ({why}); "
                "nothing was cancelled: try again when the cluster answers"
            )
        active = [j for j, s in states[record.run_id].items() if s.active]
        latest = record.latest_job
        last = states[record.run_id][latest].state if latest is not None else None
        if not active and last == "COMPLETED":
            return record, [], None
        # also where no job is left to stop: a local sweep's runner that would still start or resume the
        # run heeds the marker (one written after it was asked to)
        atomic_write(record.paths.cancel_marker, f"{time.time()}\n".encode())
        if not active and last in (None, "CANCELLED"):
            return record, [], None
        ex = executor(record.executor)
        for job_id in active:
            ex.job(record, job_id).cancel()
        # a stopped attempt waiting for a resume is cancelled too; a failed one keeps its failure
        marked = active or ([latest] if latest and last in RESUMABLE else [])
        record.cancelled = sorted(set(record.cancelled) | set(marked))
        return record, marked, save(record, index, strict=False)
