"""Submitting, cancelling and resuming a sweep: every member through :mod:`cluster.runs`.

All members are planned before anything is written; a problem of any member refuses the whole sweep
with one line per problem (each naming the member's values).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import nodes, runs
from cluster.errors import Failure, UsageError
from cluster.executors import executor
from cluster.index import Index
from cluster.record import RunRecord
from cluster.sweep import (
    SweepRecord,
    collect_problems,
    is_refusal,
    member_label,
    member_overrides,
    new_sweep_id,
    parse_grid,
    save_sweep,
    sweeps_dir,
)
from schemas import RunSpec
from schemas.contract import SUBMITIT_DIR


@dataclass
class SweepPlan:
    sweep_id: str
    members: list[dict[str, str]]  # the swept values of each member (as given)
    plans: list[runs.Submission]
    max_parallel: int | None

    @property
    def executor(self) -> str:
        return self.plans[0].executor

    def resolved(self, plan: runs.Submission, values: dict[str, str]) -> dict[str, Any]:
        """Each swept value as the validated spec holds it (defaults and coercions applied)."""
        data: Any = plan.spec.model_dump(mode="json")
        out = {}
        for key in values:
            node = data
            for part in key.split("."):
                node = node[int(part)] if isinstance(node, list) else node.get(part)
            out[key] = node
        return out

    def array_line(self) -> str:
        n = len(self.plans)
        if self.executor == "slurm":
            return f"# one SLURM job array of {n} members: --array=0-{n - 1}%{min(n, self.max_parallel or n)}"
        at_once = min(n, self.max_parallel or n)
        return f"# {n} members on this machine, {at_once} at a time"

    def array_script(self) -> str | None:
        """The sbatch script of the array (SLURM only): a member's, with ``--array``."""
        first = self.plans[0]
        if first.script is None:
            return None
        from cluster.slurm import render_script

        n = len(self.plans)
        params = {**first.description.params, "map_count": n, "array_parallelism": self.max_parallel or n}
        return render_script(params, sweeps_dir() / self.sweep_id / SUBMITIT_DIR)

    def dry_run_text(self) -> str:
        out = [f"# sweep {self.sweep_id}", self.array_line()]
        for i, (plan, values) in enumerate(zip(self.plans, self.members, strict=True)):
            shown = " ".join(f"{k}={json.dumps(v)}" for k, v in self.resolved(plan, values).items())
            out.append(f"# member {i}: {plan.run_id}  {shown}")
        script = self.array_script()
        if script is not None:
            out += ["", "# sbatch script of the array", script.rstrip()]
        first = self.plans[0].dry_run_text().rstrip()
        out += ["", "# member 0 (the others differ only in the values above)", first]
        return "\n".join(out) + "\n"

    def payload(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "executor": self.executor,
            "max_parallel": self.max_parallel,
            "members": [
                {
                    "run_id": p.run_id,
                    "sweep_values": self.resolved(p, v),
                    "spec": p.spec.model_dump(mode="json"),
                }
                for p, v in zip(self.plans, self.members, strict=True)
            ],
            "sbatch": self.array_script(),
        }


def _flag_keys(nodes: int | None, gpus: int | None) -> tuple[tuple[str, str, int | None], ...]:
    """The spec keys ``--nodes`` and ``--gpus`` set."""
    return (("resources.nodes", "--nodes", nodes), ("resources.gpus_per_node", "--gpus", gpus))


def plan_sweep(
    spec_path: Path,
    sweeps: Sequence[str],
    *,
    max_parallel: int | None,
    nodes: int | None,
    gpus: int | None,
    executor: str,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    preflight: bool = True,
    check: Callable[[RunSpec], object] | None = None,
) -> SweepPlan:
    """Plan every member (as ``pixpro submit`` plans one run, ``check`` included); every member's
    problems at once. The members' checkpoint folders and preflights come last, when each member's own
    folder is known: no usage error waits for N preflights."""
    if max_parallel is not None and max_parallel < 1:
        raise UsageError(f"--max-parallel {max_parallel}: must be at least 1")
    members = parse_grid(sweeps)
    given = {o.partition("=")[0].strip(): "--set " + o.partition("=")[0].strip() for o in overrides}
    given |= {key: flag for key, flag, v in _flag_keys(nodes, gpus) if v is not None}
    swept = sorted(set(given) & set(members[0]))
    if swept:  # one of the two would silently win
        raise UsageError([f"{given[key]}: the sweep sets {key} (--sweep {key}=...)" for key in swept])
    plans: list[runs.Submission] = []
    problems: list[str] = []
    fixed: dict[str, Any] = {
        "nodes": nodes, "gpus": gpus, "executor": executor, "dry_run": dry_run,
        "preflight": False, "free_folder": False,  # both below, once each member's folder is known
    }  # fmt: skip
    for values in members:
        kwargs = {**fixed, "overrides": [*overrides, *member_overrides(values)]}
        try:
            sub = runs.plan_submission(spec_path, check=check, **kwargs)
            while sub.run_id in {p.run_id for p in plans}:  # run ids of one second differ in 4 hex digits
                sub = runs.plan_submission(spec_path, **kwargs)  # the checks passed
            plans.append(sub)
        except Exception as exc:
            if not is_refusal(exc):
                raise
            problems += collect_problems(values, exc)
    if not problems:
        problems = _shared_problems(plans, members)
    if problems:
        raise UsageError(problems)
    own_checkpoint_folders(plans)
    if not dry_run:
        _each_member(plans, members, lambda p: runs.check_checkpoint_folder_free(p.spec))
        if preflight:
            _each_member(plans, members, _preflight)
    return SweepPlan(new_sweep_id(plans[0].spec.name), members, plans, max_parallel)


def _each_member(
    plans: list[runs.Submission], members: list[dict[str, str]], check: Callable[[runs.Submission], object]
) -> None:
    """``check`` of every member; every member's refusal at once."""
    problems: list[str] = []
    for plan, values in zip(plans, members, strict=True):
        try:
            check(plan)
        except Exception as exc:
            if not is_refusal(exc):
                raise
            problems += collect_problems(values, exc)
    if problems:
        raise UsageError(problems)


def _preflight(plan: runs.Submission) -> None:
    plan.preflight = runs.run_preflight(plan.spec)


def _shared_problems(plans: list[runs.Submission], members: list[dict[str, str]]) -> list[str]:
    """Members share one sbatch script (resources)."""
    problems = []
    first = plans[0].spec.resources
    for plan, values in zip(plans[1:], members[1:], strict=True):
        if plan.spec.resources != first:
            problems.append(
                f"sweep member {member_label(values)}: resources differ from member "
                f"{member_label(members[0])}'s (a sweep is one job array: one sbatch script for every member)"
            )
    return problems


def own_checkpoint_folders(plans: list[runs.Submission]) -> None:
    """A ``checkpoint.url`` the members would share (the spec's own, e.g. an S3 prefix) becomes one
    folder per member below it, ``<url>/<run_id>``: exact resume needs a store per run."""
    urls = [p.spec.checkpoint.url for p in plans]
    if len(set(urls)) == len(urls):
        return
    for plan in plans:
        ckpt = plan.spec.checkpoint
        url = f"{str(ckpt.url).rstrip('/')}/{plan.run_id}"
        plan.spec = plan.spec.model_copy(update={"checkpoint": ckpt.model_copy(update={"url": url})})


def submit_sweep(plan: SweepPlan) -> tuple[SweepRecord, list[RunRecord], list[str]]:
    """Create every member's run and queue them (one array on SLURM): (sweep, members, warnings)."""
    index = Index()
    sweep = SweepRecord(
        sweep_id=plan.sweep_id,
        name=plan.plans[0].spec.name,
        created=time.time(),
        executor=plan.executor,
        max_parallel=plan.max_parallel,
        keys=list(plan.members[0]),
    )
    records: list[RunRecord] = []
    try:
        for sub, values in zip(plan.plans, plan.members, strict=True):
            record = runs.create_run(sub)
            record.sweep_id, record.sweep_values = sweep.sweep_id, plan.resolved(sub, values)
            records.append(record)
            runs.save(record, index)
            sweep.members.append({"run_id": record.run_id, "values": record.sweep_values})
        save_sweep(sweep)
        job_ids = executor(sweep.executor).submit_sweep(
            records, plan.plans[0].spec, index, sweeps_dir() / sweep.sweep_id, plan.max_parallel
        )
    except BaseException:
        for record in records:
            runs.rollback(record, index)
        import shutil

        shutil.rmtree(sweeps_dir() / sweep.sweep_id, ignore_errors=True)
        raise
    warnings = []
    for record, job_id in zip(records, job_ids, strict=True):
        if job_id is not None:
            runs.add_attempt(record, job_id, time.time())
            warning = runs.save(record, index, strict=False)
            warnings += [warning] if warning else []
    sweep.array_job = job_ids[0].split("_")[0] if job_ids[0] and "_" in job_ids[0] else None
    save_sweep(sweep)
    return sweep, records, warnings


@contextlib.contextmanager
def _every_member_locked(sweep: SweepRecord, index: Index) -> Iterator[list[RunRecord]]:
    """Every member's run lock, taken in one order (two sweep commands never wait on each other): no
    resume, cancel or sweep runner acts on a member meanwhile. Yields the records read under them."""
    from cluster.record import run_lock

    with contextlib.ExitStack() as held:
        for run_id in sorted(sweep.run_ids):
            held.enter_context(run_lock(index.find(run_id)))
        yield [index.find(r) for r in sweep.run_ids]


def cancel_sweep(sweep: SweepRecord) -> list[tuple[str, list[str]]]:
    """Cancel every member, under every member's lock: the local sweep runner starts none of them
    meanwhile, and leaves those marked before they started (:func:`runs.cancel` marks them too)."""
    with _every_member_locked(sweep, Index()):
        return [(run_id, runs.cancel(run_id)[1]) for run_id in sweep.run_ids]


def array_throttle(max_parallel: int | None, active: int, due: int) -> int:
    """The ``%N`` of the array that resumes ``due`` members while ``active`` others are queued or
    running: what ``--max-parallel`` leaves (at least one), all of them where it sets no bound."""
    return min(due, max(1, max_parallel - active)) if max_parallel else due


def _resume_as_array(
    sweep: SweepRecord, due: list[RunRecord], index: Index, throttle: int
) -> list[tuple[str, str | None]]:
    """The next attempts of ``due`` as one SLURM job array of at most ``throttle`` tasks at once, checked
    against the cluster once (the members' resources and left-out nodes are the same); the sweep's
    record names the new array."""
    from schemas import load_spec

    spec = load_spec(due[0].spec_path)
    ex = executor("slurm")
    ex.recheck(spec, Path(due[0].run_dir))
    for record in due:
        record.paths.cancel_marker.unlink(missing_ok=True)
    job_ids = ex.submit_sweep(due, spec, index, sweeps_dir() / sweep.sweep_id, throttle)
    sweep.array_job = str(job_ids[0]).partition("_")[0]
    save_sweep(sweep)
    now = time.time()
    for record, job_id in zip(due, job_ids, strict=True):
        assert job_id is not None  # SLURM queues every task of the array now
        runs.add_attempt(record, job_id, now)
        runs.resumed(record, job_id, index)  # as a sweep's resume of one member: warnings unsaid
    return [(record.run_id, job_id) for record, job_id in zip(due, job_ids, strict=True)]


def _queue_resumes(sweep_dir: Path, later: list[RunRecord]) -> None:
    """Members a sweep runner resumes as slots free up: queued now, so their cancel markers go now (as
    :func:`runs.resume` removes a run's when it queues its attempt), each under the run's lock; ``pixpro
    status`` shows one that never started PENDING (waits for a slot of its sweep) from here on, not
    CANCELLED (before it started) until the runner gets to it. A cancel from now on writes a new marker,
    which the runner heeds. A runner that does not start leaves them cancelled, as they were. Called
    with every member's lock held (:func:`resume_sweep`)."""
    from cluster.record import atomic_write
    from cluster.sweep_runner import spawn_sweep_runner

    cleared: list[tuple[RunRecord, bytes]] = []
    for record in later:
        marker = record.paths.cancel_marker
        with contextlib.suppress(FileNotFoundError):
            cleared.append((record, marker.read_bytes()))
            marker.unlink()
    try:
        spawn_sweep_runner(sweep_dir, resume=[r.run_id for r in later])
    except BaseException:
        for record, text in cleared:
            atomic_write(record.paths.cancel_marker, text)
        raise


def resume_sweep(sweep: SweepRecord) -> list[tuple[str, str | None]]:
    """Resume every member that has not completed and has no attempt queued or running; a member the
    local sweep runner will still start is left to it (resuming it would start it twice). Locally, at
    most ``--max-parallel`` members run: those beyond it are resumed by a sweep runner as members end
    (job id None). On SLURM the members resumed together are one new job array whose ``%N`` is what
    ``--max-parallel`` leaves beside the members still queued or running (at least one; it stays so
    when those end), where the members leave out the same nodes; else each is a job of its own."""
    index = Index()
    with _every_member_locked(sweep, index) as records:
        return _resume_members(sweep, index, records)


def _resume_members(
    sweep: SweepRecord, index: Index, records: list[RunRecord]
) -> list[tuple[str, str | None]]:
    """:func:`resume_sweep` with every member's lock held, ``records`` read under them."""
    from cluster.status import attempt_states, read_all_progress, run_state
    from cluster.sweep_runner import runner_alive, runner_resumes

    states, _ = attempt_states(records, read_all_progress(records))
    runs.refuse_unanswered(records, states)
    sweep_dir = sweeps_dir() / sweep.sweep_id
    waiting, queued = runner_alive(sweep_dir), runner_resumes(sweep_dir)
    active = sum(any(s.active for s in states[r.run_id].values()) for r in records)
    due = [
        r
        for r in records
        if run_state(r, states[r.run_id]).state != "COMPLETED"
        and not any(s.active for s in states[r.run_id].values())
        and r.run_id not in queued
        and not (waiting and not r.attempts and not r.paths.cancel_marker.exists())  # the runner starts it
    ]
    room = len(due) if sweep.executor != "local" else max(0, (sweep.max_parallel or len(records)) - active)
    if sweep.executor == "slurm" and len(due) > 1 and len({tuple(nodes.excluded(r)) for r in due}) == 1:
        return _resume_as_array(sweep, due, index, array_throttle(sweep.max_parallel, active, len(due)))
    resumed: list[tuple[str, str | None]] = []
    problems = []
    for record in due[:room]:
        try:
            _, job_id, _ = runs.resume(record.run_id)  # under the run's lock
        except Failure as exc:
            problems += [f"run {record.run_id}: {line}" for line in exc.lines]
            continue
        if job_id is not None:
            resumed.append((record.run_id, job_id))
    later = due[room:]
    if later:
        _queue_resumes(sweep_dir, later)
        resumed += [(r.run_id, None) for r in later]
    if problems and not resumed:
        raise Failure(problems)
    return resumed
