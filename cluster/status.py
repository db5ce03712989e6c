"""Rows of ``pixpro status``: each run's attempts and state plus the trainer's own progress.

All SLURM jobs of all runs are queried with one ``squeue`` and one ``sacct`` call, answered while the
checkpoint folders are read (those on object stores in parallel). Nothing here imports torch or submitit.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cluster import evals, nodes
from cluster.attempts import AttemptState
from cluster.executors import Job, Jobs, executor
from cluster.progress import Progress, open_run_store, read_heartbeats, read_progress
from cluster.record import RunRecord
from cluster.slurm import STATUS_TIMEOUT_S
from launch.store.format import is_local_url

if TYPE_CHECKING:
    from schemas.contract import EvalRequest
from schemas.contract import excluded_nodes, stalled_for, wandb_run_id


def read_all_progress(records: list[RunRecord]) -> dict[str, Progress]:
    def one(rec: RunRecord) -> Progress:
        try:
            return read_progress(open_run_store(rec.checkpoint_url, rec.storage_options))
        except Exception as exc:
            return Progress(error=f"{type(exc).__name__}: {exc}")

    remote = [r for r in records if not is_local_url(r.checkpoint_url)]
    out = {r.run_id: one(r) for r in records if is_local_url(r.checkpoint_url)}
    if remote:
        with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
            out.update(zip([r.run_id for r in remote], pool.map(one, remote), strict=False))
    return out


def attempt_states(
    records: list[RunRecord], progress: dict[str, Progress]
) -> tuple[dict[str, dict[str, AttemptState]], list[str]]:
    """State of every attempt of every run: {run_id: {job_id: AttemptState}}, and warnings; one batched
    query per executor."""
    asked = ask_executors(records)
    return states_of(asked.attempts, progress), asked.warnings


def ask_executors(records: list[RunRecord], timeout_s: float | None = None) -> Jobs:
    """The handles of every attempt of these runs with their executors' answers, and the states of their
    evaluation jobs (one batched query per executor: one ``squeue`` and one ``sacct`` for all SLURM
    runs), and warnings."""
    out = Jobs({}, {})
    for name in dict.fromkeys(r.executor for r in records):
        found = executor(name).jobs([r for r in records if r.executor == name], timeout_s)
        out.attempts.update(found.attempts)
        out.evals.update(found.evals)
        out.warnings += found.warnings
    return out


def eval_rows(rec: RunRecord, asked: list[tuple[EvalRequest, AttemptState]]) -> list[dict[str, Any]]:
    """The run's evaluation jobs for ``pixpro status``: state, and the result once there is one."""
    out = []
    for request, job in asked:
        found = evals.result(rec, request.eval_id)
        out.append(evals.row(request, evals.state(found, job), found))
    return out


def states_of(
    handles: dict[str, list[Job]], progress: dict[str, Progress]
) -> dict[str, dict[str, AttemptState]]:
    """Each handle's state, with what its run's trainer wrote."""
    return {
        run_id: {j.job_id: j.state(progress[run_id].trainer if run_id in progress else None) for j in jobs}
        for run_id, jobs in handles.items()
    }


def run_state(rec: RunRecord, states: dict[str, AttemptState]) -> AttemptState:
    last = states[rec.attempts[-1]] if rec.attempts else None
    if rec.sweep_id and rec.executor == "local" and not (last and last.active):
        waits = _waits_for_its_sweep(rec, last)
        if waits is not None:
            return waits
    if last is None:
        return AttemptState("UNKNOWN", "never submitted")
    return last


def _waits_for_its_sweep(rec: RunRecord, last: AttemptState | None) -> AttemptState | None:
    """A local sweep member its sweep's runner is still to start, or to resume (``pixpro resume SWEEP``
    beyond ``--max-parallel``): PENDING until it does, CANCELLED once cancelled before; a first attempt
    whose runner is gone says so. None: not one of those."""
    from cluster.sweep import sweeps_dir
    from cluster.sweep_runner import runner_alive, runner_resumes

    folder = sweeps_dir() / rec.sweep_id
    if last is None:
        if rec.paths.cancel_marker.exists():
            return AttemptState("CANCELLED", "before it started")
        if runner_alive(folder):
            return AttemptState("PENDING", "waits for a slot of its sweep")
        return AttemptState("UNKNOWN", f"its sweep's runner ended before it: pixpro resume {rec.sweep_id}")
    if not rec.paths.cancel_marker.exists() and rec.run_id in runner_resumes(folder):
        return AttemptState("PENDING", "waits for a slot of its sweep")
    return None


def stalled(rec: RunRecord, st: AttemptState, now: float) -> tuple[AttemptState, float | None]:
    """A RUNNING run whose newest heartbeat is older than its hang timeout is STALLED (with the age):
    its GPUs are held and nothing moves. Returns the state and the heartbeat's age (None: no beat)."""
    beats = read_heartbeats(rec.run_dir) if st.state == "RUNNING" else []
    times = [r.time for b in beats for r in b.ranks]
    age = round(now - max(times), 1) if times else None
    found = stalled_for(beats, now)
    if found is None:
        return st, age
    since, limit = found
    reason = f"no progress for {since:.0f} s, hang timeout {limit:g} s"
    return AttemptState("STALLED", reason, st.exit_code, st.history), age


def collect(records: list[RunRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    with ThreadPoolExecutor(max_workers=1) as pool:  # SLURM answers while the stores are read
        asking = pool.submit(ask_executors, records, STATUS_TIMEOUT_S)  # a display: UNKNOWN past it
        progress = read_all_progress(records)
        asked = asking.result()
    states, warnings = states_of(asked.attempts, progress), asked.warnings
    now = time.time()
    rows = []
    for rec in records:
        p = progress[rec.run_id]
        st, heartbeat_age = stalled(rec, run_state(rec, states[rec.run_id]), now)
        failed_nodes = nodes.counts(rec)
        attempts = states[rec.run_id]
        rows.append(
            {
                "run_id": rec.run_id,
                "name": rec.name,
                "state": st.state,
                "reason": st.reason,
                "job_id": rec.latest_job,
                "attempts": [
                    {"job_id": j, "state": s.state, "reason": s.reason, "history": list(s.history)}
                    for j, s in states[rec.run_id].items()
                ],
                "executor": rec.executor,
                "nodes": rec.nodes,
                "gpus_per_node": rec.gpus_per_node,
                "step": p.step,
                "total_steps": p.total_steps,
                "epoch": p.epoch,
                "trainer_state": (p.trainer or {}).get("state"),
                "checkpoint_step": p.checkpoint_step,
                "checkpoint_age_s": None if p.checkpoint_time is None else round(now - p.checkpoint_time, 1),
                "lr": p.now("lr"),  # at "step"
                "ema_momentum": p.now("ema_momentum"),
                "img_per_s": p.metric("img_per_s"),
                "loss": p.metric("loss"),
                "data_skips": p.metric("data_skips"),
                "knn_top1": p.metric("knn_top1"),  # the kNN monitor's newest result and its step
                "knn_top5": p.metric("knn_top5"),
                "knn_step": p.metric("knn_step"),
                "updated": (p.trainer or {}).get("updated"),
                "record_age_s": None if p.record_time is None else round(now - p.record_time, 1),
                "heartbeat_age_s": heartbeat_age,
                "eta_s": eta_s(st.state, p),
                "expected_start": st.expected_start,  # a pending job's, when SLURM has planned it
                "requeues": sum(a.requeues for a in attempts.values()),
                "failed_nodes": failed_nodes,  # node -> failures blamed on it (since --include-node)
                "excluded_nodes": excluded_nodes(failed_nodes),  # left out of the next attempts
                "created": rec.created,
                "checkpoint_url": rec.checkpoint_url,
                "run_dir": rec.run_dir,
                "tensorboard_dir": str(rec.paths.tensorboard),  # tensorboard --logdir
                "wandb_run_id": wandb_run_id(rec.run_id),  # if the spec has logging.wandb
                "store_error": p.error,
                "sweep_id": rec.sweep_id or None,  # the sweep this run is a member of
                "sweep_values": rec.sweep_values,  # its swept spec values
                "evals": eval_rows(rec, asked.evals.get(rec.run_id, [])),  # pixpro eval --submit
                **commit_health(p, rec.resources.get("signal_lead_s")),
            }
        )
    return rows, warnings


def eta_s(state: str, p: Progress) -> float | None:
    """Seconds to the last step of a running run at the trainer's recent pace (its newest metrics
    record: steps per second over the last log interval); None when not running or not yet known."""
    rate, step, total = p.metric("steps_per_s"), p.step, p.total_steps
    if state != "RUNNING" or not rate or step is None or total is None:
        return None
    return round(max(0, total - step) / rate, 1)


def commit_health(p: Progress, signal_lead_s: float | None) -> dict[str, Any]:
    """How long checkpoints take to commit, whether the trainer reaches its store, and whether the last
    preemption's checkpoint made it: what decides if a preemption loses work."""
    newest, older = p.newest_first()
    commit_s = [r.get(k) for r in (newest, older) if r for k in ("commit_s", "last_commit_s")]
    known = [c for c in commit_s if isinstance(c, int | float)]
    trainer_error = (newest or {}).get("store_error")  # metrics omit it while the store works
    return {
        "commit_s": max(known) if known else None,
        "signal_lead_s": signal_lead_s,
        "trainer_store_error": trainer_error,
        "preempt_committed": (p.trainer or {}).get("preempt_committed"),
    }


STALE_RECORD_S = 120.0
"""A running trainer writes a metrics record every ``log_every_steps``: none for this long means it does
not reach its store (or is stuck), and the step shown is that old."""


def checkpoint_warnings(row: dict[str, Any]) -> list[str]:
    """One line per risk to the run's checkpoints and next attempts, for ``pixpro status``."""
    out = []
    run, lead, commit = row["run_id"], row.get("signal_lead_s"), row.get("commit_s")
    if lead is not None and commit is not None and lead < 2 * commit:
        out.append(
            f"run {run}: resources.signal_lead_s {lead:g} s is less than twice the last checkpoint's "
            f"commit time ({commit:.1f} s): a preemption may not commit in time"
        )
    if row.get("trainer_store_error"):
        out.append(
            f"run {run}: the trainer cannot reach its checkpoint store "
            f"(last commit {row['checkpoint_age_s'] or '?'} s ago): {row['trainer_store_error']}"
        )
    age_s = row.get("record_age_s")
    if row.get("state") == "RUNNING" and age_s is not None and age_s > STALE_RECORD_S:
        out.append(
            f"run {run}: the trainer's newest record (step {row.get('step')}) is {age_s:.0f} s old: it may "
            f"not reach its checkpoint store{_store_note(row)}, or it is stuck"
        )
    if row.get("excluded_nodes"):
        left_out = ", ".join(f"{n} ({row['failed_nodes'][n]} failures)" for n in row["excluded_nodes"])
        out.append(
            f"run {run}: its next attempts leave out {left_out} (sbatch --exclude); "
            f"pixpro resume {run} --include-node NODE gives a node another chance"
        )
    if row.get("preempt_committed") is False:
        out.append(
            f"run {run}: the last preemption did not commit its checkpoint in time: "
            f"the next attempt resumes from step {row['checkpoint_step']}"
        )
    return out


def _store_note(row: dict[str, Any]) -> str:
    last = row.get("trainer_store_error")
    return f" (its last store error: {last})" if last else ""
