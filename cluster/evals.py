"""Evaluations as jobs: ``pixpro eval RUN --submit [--after]`` and ``pixpro submit --eval TASK``.

The request is written into the run folder (``evals/<eval_id>/request.json``) before anything is
queued, so the job finds it; the job (:mod:`launch.eval_job`) writes the result beside it, which
``pixpro status`` shows. The job goes through the run's executor: on SLURM one node with the GPUs
asked for, ``--after`` as ``afterok`` on the run's latest job (a requeued run keeps its job id, so the
evaluation waits through preemptions); on the local executor a detached runner that waits for the run's
latest attempt (:mod:`cluster.eval_runner`). ``pixpro resume`` points evaluations still waiting on an
ended attempt at the new one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.attempts import AttemptState
from cluster.errors import Failure, UsageError
from cluster.record import RunRecord
from launch.store.format import absolute_url
from schemas.contract import EVAL_HEADLINE, LATEST_ATTEMPT, atomic_write

if TYPE_CHECKING:
    from cluster.index import Index
    from schemas.contract import EvalRequest, EvalResult

TASKS = tuple(EVAL_HEADLINE)
RESOURCE_KEYS = "resources."
"""``--set`` of an evaluation job may change its resources only (partition, time limit, account ...)."""


def waits_on(request: EvalRequest) -> str | None:
    """What the evaluation waits for before it starts: a job of its run, :data:`LATEST_ATTEMPT`, or None
    (it evaluates the latest checkpoint at once). Every reader of ``request.after`` asks this: requests
    written before the marker held ``""`` for it."""
    if request.after is None:
        return None
    return request.after or LATEST_ATTEMPT


def after_job(request: EvalRequest) -> str | None:
    """The job the evaluation waits for by its id (SLURM's ``afterok``), None where it waits for none or
    for the run's latest attempt, whichever that is."""
    job = waits_on(request)
    return None if job == LATEST_ATTEMPT else job


def default_data(spec: Any) -> str | None:
    """The labelled data an evaluation uses when none is named: the kNN monitor's."""
    monitor = getattr(spec, "monitor", None)
    return getattr(monitor, "data", None) if monitor is not None else None


def check_task(task: str, option: str = "--task") -> str:
    if task not in TASKS:
        raise UsageError(f"{option} {task}: must be one of {', '.join(TASKS)}")
    return task


def check_request(
    task: str, data: str | None, spec: Any = None, options: tuple[str, str] = ("--task", "--data")
) -> str:
    """Refuse (exit 2) what no evaluation job could run, naming the options of the command typed
    (``submit`` has ``--eval``/``--eval-data``); returns the data. A folder that does not exist is
    refused now, not when the job starts after training, unless it is the run's own demo data, which
    the run generates."""
    check_task(task, options[0])
    if not data:
        raise UsageError(
            f"an evaluation ({task}) needs labelled data: {options[1]} (the spec has no monitor.data)"
        )
    if "://" not in data and not Path(data).exists() and not _generated_by(spec, data):
        raise UsageError(f"{options[1]}: data folder {data} does not exist")
    return data


def _generated_by(spec: Any, data: str) -> bool:
    """Whether the run ``spec`` describes writes ``data`` itself: its demo scenes, generated into
    ``data.root`` when that does not exist."""
    section = getattr(spec, "data", None)
    if section is None or section.demo is None:
        return False
    return Path(data).expanduser().resolve() == Path(section.root).expanduser().resolve()


def check_sets(sets: Sequence[str]) -> Sequence[str]:
    for dotted in sets:
        if not dotted.strip().startswith(RESOURCE_KEYS):
            raise UsageError(f"--set {dotted.strip()}: an evaluation job takes only resources.* settings")
    return sets


GPUS_KEY, NODES_KEY = "resources.gpus_per_node", "resources.nodes"


def eval_spec(record: RunRecord, gpus: int | None, sets: Sequence[str]) -> Any:
    """The run's spec with the evaluation job's resources: one node, ``--gpus`` or else ``--set
    resources.gpus_per_node`` (validated as any ``--set``; one GPU where the run used GPUs when neither
    is given), and the other ``--set resources.*`` given. A ``--set`` is never silently overridden by a
    default: ``--gpus`` with ``--set resources.gpus_per_node`` is refused, as is more than one node."""
    from cluster.specs import resolve_spec

    keys = {dotted.partition("=")[0].strip() for dotted in sets}
    if gpus is not None and GPUS_KEY in keys:
        raise UsageError(f"--gpus and --set {GPUS_KEY} both set the evaluation job's GPUs: give one")
    if gpus is None and GPUS_KEY not in keys:
        gpus = min(1, record.gpus_per_node)
    spec = resolve_spec(
        record.spec_path, nodes=None if NODES_KEY in keys else 1, gpus=gpus, overrides=tuple(sets)
    )
    if spec.resources.nodes != 1:
        raise UsageError(f"--set {NODES_KEY}={spec.resources.nodes}: an evaluation job runs on one node")
    return spec


def _new_folder(record: RunRecord, task: str) -> str:
    """``<task>-<n>``, claimed by mkdir: two submissions at once never share a folder."""
    record.paths.evals.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for p in record.paths.evals.glob(f"{task}-*"))
    while True:
        eval_id = f"{task}-{n}"
        try:
            record.paths.eval(eval_id).folder.mkdir()
            return eval_id
        except FileExistsError:
            n += 1


def write_request(record: RunRecord, request: EvalRequest) -> None:
    atomic_write(record.paths.eval(request.eval_id).request, request.model_dump_json(indent=2).encode())


def submit(
    record: RunRecord, task: str, data: str, *, seed: int, after: str | None, spec: Any, cwd: Path
) -> EvalRequest:
    """Write the request, queue the job through the run's executor, record its job id."""
    from cluster.executors import executor
    from schemas.contract import EvalRequest

    eval_id = _new_folder(record, task)
    resources = spec.resources
    request = EvalRequest(
        eval_id=eval_id,
        task=task,  # checked by check_request
        data=absolute_url(data, cwd),
        seed=seed,
        executor=record.executor,
        submitted=time.time(),
        after=after,
        resources={
            "gpus_per_node": resources.gpus_per_node,
            "partition": resources.partition,
            "time_limit_min": resources.time_limit_min,
            "workers": spec.data.num_workers,
        },
    )
    write_request(record, request)
    try:
        request.job_id = executor(record.executor).submit_eval(record, spec, request)
    except BaseException:
        import shutil

        shutil.rmtree(record.paths.eval(eval_id).folder, ignore_errors=True)
        raise
    write_request(record, request)
    return request


def requests(record: RunRecord) -> list[EvalRequest]:
    """The run's evaluation jobs, oldest first (a folder whose request is unreadable is skipped)."""
    folder = record.paths.evals
    if not folder.is_dir():
        return []
    from schemas.contract import EvalRequest  # the model (pydantic) only for a run with evaluations

    out = []
    for path in folder.glob("*/request.json"):
        try:
            out.append(EvalRequest.model_validate_json(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.submitted)


def find_run(index: Index, ident: str) -> tuple[RunRecord, EvalRequest | None]:
    """The run ``ident`` names (its id, an attempt's job id, an id prefix), or the run and evaluation
    whose job it is (``pixpro logs``/``status`` of an evaluation's job id): the run index knows attempts
    only, so every run's requests are read, and only when no run matched."""
    from cluster.errors import NotFound

    try:
        return index.find(ident), None
    except NotFound:
        for record in index.all():
            for request in requests(record):
                if request.job_id == ident:
                    return record, request
        raise


def result(record: RunRecord, eval_id: str) -> EvalResult | None:
    from schemas.contract import EvalResult

    try:
        return EvalResult.model_validate_json(record.paths.eval(eval_id).result.read_bytes())
    except (OSError, ValueError):
        return None


def state(found: EvalResult | None, job: AttemptState) -> AttemptState:
    """The evaluation's state: its result where it wrote one, else what the executor says of its job
    (``PENDING (Dependency)`` while it waits for the run)."""
    if found is not None and found.state == "completed":
        return AttemptState("COMPLETED")
    if found is not None and found.state == "failed":  # a cancelled job may fail as it stops
        return AttemptState("CANCELLED" if job.state == "CANCELLED" else "FAILED", found.error or "")
    if found is not None and not job.active:  # started, then its job ended without a result
        return AttemptState(job.state if job.state == "CANCELLED" else "FAILED", "ended without a result")
    if found is None and job.state == "COMPLETED":
        return AttemptState("FAILED", "its job ended without a result")
    if job.state in ("PREEMPTED", "REQUEUED"):
        return AttemptState("PENDING", "requeued")
    return job


def row(request: EvalRequest, st: AttemptState, found: EvalResult | None) -> dict[str, Any]:
    """One evaluation in ``pixpro status --json``: its state and the task's headline numbers."""
    numbers = (found.result or {}) if found is not None else {}
    return {
        "eval_id": request.eval_id,
        "task": request.task,
        "data": request.data,
        "job_id": request.job_id,
        "after": waits_on(request),
        "state": st.state,
        "reason": st.reason,
        "step": found.step if found is not None else None,
        **{key: numbers.get(key) for key in EVAL_HEADLINE[request.task]},
        "ended": found.ended if found is not None else None,
    }


def headline(ev: dict[str, Any]) -> str:
    """``top-1 52.3% top-5 90.1% @ step 400`` / ``mIoU 41.0% ...``, or the state while there is none."""
    if ev["state"] != "COMPLETED":
        return f"{ev['state']} ({ev['reason']})" if ev["reason"] else ev["state"]
    names = {"top1": "top-1", "top5": "top-5", "miou": "mIoU", "pixel_accuracy": "pixel acc"}
    parts = [f"{names[k]} {100 * ev[k]:.1f}%" for k in EVAL_HEADLINE[ev["task"]] if ev.get(k) is not None]
    return " ".join(parts) + f" @ step {ev['step']}"


def repoint(record: RunRecord, job_id: str) -> list[str]:
    """After ``pixpro resume``: evaluations still waiting on an earlier attempt of the run wait on
    ``job_id`` instead (SLURM takes a new dependency while a job is pending; a local one follows the
    run's latest attempt by itself); returns their eval ids."""
    from cluster.executors import executor
    from cluster.status import ask_executors

    moved = []
    for request, job in ask_executors([record]).evals.get(record.run_id, []):
        if waits_on(request) in (None, job_id) or job.state != "PENDING":
            continue
        executor(request.executor).eval_waits_on(request, job_id)
        request.after = job_id
        write_request(record, request)
        moved.append(request.eval_id)
    return moved


def cancel(record: RunRecord, request: EvalRequest) -> bool:
    """``pixpro cancel`` of an evaluation's job: stop it if it is queued, waiting or running (marked, so a
    local one reads CANCELLED); whether there was anything to stop."""
    from cluster.executors import executor
    from cluster.status import ask_executors

    found = ask_executors([record]).evals.get(record.run_id, [])
    st = next((st for r, st in found if r.eval_id == request.eval_id), None)
    if request.job_id is None or st is None or not st.active:
        return False
    atomic_write(record.paths.eval(request.eval_id).cancel_marker, f"{time.time()}\n".encode())
    executor(request.executor).job(record, request.job_id).cancel()
    return True


def summary(record: RunRecord, request: EvalRequest) -> str:
    job = after_job(request)
    after = f", after job {job}" if job else ", after the run's latest attempt" if waits_on(request) else ""
    where = f"job {request.job_id} ({request.executor}{after})"
    return f"submitted eval {request.eval_id} of run {record.run_id} as {where}"


def waits_for(record: RunRecord) -> str | None:
    """What ``--after`` waits on: the run's latest job (:data:`LATEST_ATTEMPT` for a local sweep member
    not started yet), None for a run that completed already; a run that will not complete by itself is
    refused."""
    from cluster.status import attempt_states, read_all_progress, run_state

    states, _ = attempt_states([record], read_all_progress([record]))
    st = run_state(record, states[record.run_id])
    if st.state == "COMPLETED":
        return None
    if st.active:
        return record.latest_job or LATEST_ATTEMPT
    raise UsageError(
        f"--after: run {record.run_id} is {st.state} and will not complete by itself: "
        f"pixpro resume {record.run_id} first, or evaluate its last checkpoint without --after"
    )


def submit_for_run(
    ident: str, task: str, data: str | None, *, seed: int, after: bool, gpus: int | None, sets: Sequence[str]
) -> tuple[RunRecord, EvalRequest]:
    """``pixpro eval RUN --submit``: every check before anything is written or queued."""
    from cluster.index import Index

    check_task(task)
    check_sets(sets)
    record = Index().find(ident)
    spec = eval_spec(record, gpus, sets)
    data = check_request(task, data or default_data(spec), spec)
    waits = waits_for(record) if after else None
    if not after:
        _check_committed(record)
    return record, submit(record, task, data, seed=seed, after=waits, spec=spec, cwd=Path.cwd())


def _check_committed(record: RunRecord) -> None:
    """An evaluation of the latest checkpoint now needs one: refused here (as the foreground ``eval``
    refuses it), not queued to fail in its job."""
    from cluster.errors import NotFound
    from cluster.progress import open_run_store

    try:
        found = open_run_store(record.checkpoint_url, record.storage_options).latest()
    except Exception:  # the store does not answer: the job will say so, or find it back
        return
    if found is None:
        raise NotFound(
            f"run {record.run_id} has no committed checkpoint yet: --after evaluates it once the run "
            "completed"
        )


def submit_after_run(record: RunRecord, task: str, data: str) -> EvalRequest:
    """``pixpro submit --eval TASK``: an evaluation of a run just queued, after its run's job."""
    spec, after = eval_spec(record, None, ()), record.latest_job or LATEST_ATTEMPT
    return submit(record, task, data, seed=0, after=after, spec=spec, cwd=Path.cwd())


def for_submit(task: str | None, data: str | None, spec: Any) -> tuple[str, str] | None:
    """``pixpro submit --eval TASK [--eval-data D]``, checked before anything queues: (task, data)."""
    if task is None:
        return None
    return task, check_request(task, data or default_data(spec), spec, ("--eval", "--eval-data"))


def queue_after(
    records: list[RunRecord], eval_of: tuple[str, str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """``--eval``: one evaluation per run just queued, after its run: their rows, and a warning for each
    that could not be queued (the runs are queued already) with the command that queues it later."""
    if eval_of is None:
        return [], []
    queued, warnings = [], []
    for record in records:
        try:
            request = submit_after_run(record, *eval_of)
        except (Failure, UsageError) as exc:
            later = f"pixpro eval {record.run_id} --task {eval_of[0]} --submit --after"
            warnings.append(f"run {record.run_id}: evaluation not queued ({exc.lines[0]}): {later}")
            continue
        queued.append(
            {
                "run_id": record.run_id,
                "eval_id": request.eval_id,
                "job_id": request.job_id,
                "after": after_job(request) or "",  # "": the run's latest attempt, whichever it is
            }
        )
    return queued, warnings
