"""One state per attempt, from what SLURM says (queue + history) and what the trainer wrote.

SLURM alone cannot tell a preemption from a failure (a requeued step may end FAILED; a job whose
trainer stopped with a checkpoint may end COMPLETED). The trainer's ``status.json`` and exit status
75 can, so a preempted attempt is shown PREEMPTED or REQUEUED, never FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.local import LocalJob
from cluster.slurm import TERMINAL, SlurmJob
from schemas.contract import Exit

EXIT_PREEMPTED = Exit.PREEMPTED
# NODE_FAIL (active): a node of the run failed and SLURM requeued it; the job goes on by itself.
ACTIVE = frozenset({"PENDING", "REQUEUED", "NODE_FAIL", "RUNNING", "STALLED", "SUSPENDED"})
STATES = ("PENDING", "REQUEUED", "NODE_FAIL", "RUNNING", "SUSPENDED", "PREEMPTED", "TIMEOUT", "FAILED",
          "DIVERGED", "CANCELLED", "COMPLETED", "UNKNOWN")  # fmt: skip
_QUEUED = ("PENDING", "REQUEUE_HOLD", "REQUEUE_FED", "REQUEUED", "RESV_DEL_HOLD")
_RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT")


@dataclass
class AttemptState:
    state: str
    reason: str = ""
    exit_code: int | None = None
    history: tuple[str, ...] = ()  # SLURM's states of the finished runs of this job id, oldest first
    expected_start: float | None = None  # a pending job's expected start, when SLURM has planned one
    unanswered: bool = False  # UNKNOWN because the cluster did not answer (not because it forgot the job)

    @property
    def requeues(self) -> int:
        """Runs of this job id that were requeued: every ended run while it is queued or running, all
        but its last once it ended."""
        return len(self.history) if self.active else max(0, len(self.history) - 1)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def label(self) -> str:
        return f"{self.state} ({self.reason})" if self.reason else self.state


def trainer_says(trainer: dict | None, state: str, attempt_prefix: str) -> bool:
    """status.json records ``state`` by an attempt of this job (``<job>.<n>`` or ``local-<n>``)."""
    if not trainer or trainer.get("state") != state:
        return False
    attempt = str(trainer.get("attempt", ""))
    return attempt == attempt_prefix or attempt.startswith(attempt_prefix + ".")


def _diverged(
    trainer: dict | None, attempt_prefix: str, code: int | None, history: tuple = ()
) -> AttemptState | None:
    """DIVERGED, not FAILED, when the trainer stopped the attempt on non-finite steps (exit 1, no restart)."""
    if not trainer_says(trainer, "diverged", attempt_prefix):
        return None
    assert trainer is not None
    return AttemptState("DIVERGED", str(trainer.get("diverged") or "non-finite loss"), code, history)


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def slurm_state(job: SlurmJob, trainer: dict | None, cancelled: bool, recent: bool) -> AttemptState:
    """``job.history`` holds the ended runs of the job id (oldest first); while the job is queued or
    running, every one of them is an earlier run that was requeued: ``restart N`` counts them."""
    runs = job.history
    history = tuple(h.state for h in runs)
    q = (job.queue_state or "").upper()
    if not q and job.current is not None:  # squeue failed or forgot the job; sacct has a run not ended
        q = job.current.state.upper()
    if q == "COMPLETING" and job.current is None and runs:
        runs, history = runs[:-1], history[:-1]  # the accounting has the run completing now as ended
    if q and q not in TERMINAL:
        earlier = sum(1 for r in runs if r.start is not None)
        if q in _QUEUED:
            if not runs and not q.startswith("REQUEUE"):
                return AttemptState("PENDING", job.reason, None, history, job.expected_start)  # never ran
            previous = runs[-1].state.upper() if runs else "REQUEUED"
            if previous == "NODE_FAIL":
                return AttemptState("NODE_FAIL", _join("requeued", job.reason), None, history)
            reason = _join(job.reason, "preempted" if previous == "PREEMPTED" else "")
            return AttemptState("REQUEUED", reason, None, history, job.expected_start)
        if q in _RUNNING:
            # restart N: N earlier runs of this job id were requeued (a first attempt has no note)
            notes = _join("" if q == "RUNNING" else q.lower(), f"restart {earlier}" if earlier else "")
            return AttemptState("RUNNING", notes, None, history)
        if q in ("SUSPENDED", "STOPPED"):
            return AttemptState("SUSPENDED", job.reason, None, history)
        return AttemptState(q, job.reason, None, history)
    last = runs[-1] if runs else None
    final = last.state.upper() if last else q
    code = last.exit_code if last else None
    if q and job.current is not None:  # slurmdbd has not recorded the end yet: squeue's state is newer
        final, code = q, None
    if not final:
        if job.unanswered:  # no answer is not "no such job": a job just submitted is not PENDING either
            return AttemptState("UNKNOWN", f"{' and '.join(job.unanswered)} did not answer", unanswered=True)
        return AttemptState("PENDING" if recent else "UNKNOWN", "" if recent else "not in squeue or sacct")
    preempted = code == EXIT_PREEMPTED or trainer_says(trainer, "preempted", job.job_id)
    if cancelled and final == "COMPLETED" and not preempted:  # it finished before the cancel reached it
        return AttemptState("COMPLETED", "", code, history)
    if final == "CANCELLED" or cancelled:
        return AttemptState("CANCELLED", "checkpoint committed" if preempted else "", code, history)
    if final in ("PREEMPTED", "REQUEUED") or (final in ("FAILED", "COMPLETED") and preempted):
        return AttemptState("PREEMPTED", "resume with: pixpro resume", code, history)
    if final == "COMPLETED" or (final == "FAILED" and trainer_says(trainer, "completed", job.job_id)):
        return AttemptState(
            "COMPLETED", "" if final == "COMPLETED" else f"job exit {code} after training", code, history
        )
    if final in ("TIMEOUT", "DEADLINE"):
        return AttemptState("TIMEOUT", "", code, history)
    if final == "FAILED" and (diverged := _diverged(trainer, job.job_id, code, history)):
        return diverged
    if final == "FAILED":
        return AttemptState("FAILED", f"exit {code}" if code else "", code, history)
    # NODE_FAIL not requeued (--no-requeue), OUT_OF_MEMORY, BOOT_FAIL ...: the job is over
    return AttemptState("FAILED", final, code, history)


def local_state(job: LocalJob | None, trainer: dict | None, cancelled: bool) -> AttemptState:
    if job is None:
        return AttemptState("UNKNOWN", "no local job record")
    if job.alive:
        return AttemptState("RUNNING")
    code = job.exit_code
    if code is None:
        return AttemptState("FAILED", "runner vanished without an exit status")
    if code == 0:  # finished, also where a cancel came too late to stop it
        return AttemptState("COMPLETED", "", 0)
    if cancelled:
        return AttemptState("CANCELLED", "checkpoint committed" if code == EXIT_PREEMPTED else "", code)
    if code == EXIT_PREEMPTED or trainer_says(trainer, "preempted", job.job_id):
        return AttemptState("PREEMPTED", "resume with: pixpro resume", code)
    return _diverged(trainer, job.job_id, code) or AttemptState("FAILED", f"exit {code}", code)


def follow_exit_code(state: AttemptState) -> int:
    """``--follow`` exits like the attempt: 0 completed, 75 preempted (resume me), else its failure."""
    if state.state == "COMPLETED":
        return 0
    if state.state == "PREEMPTED":
        return EXIT_PREEMPTED
    if state.exit_code not in (None, 0, EXIT_PREEMPTED):
        return int(state.exit_code)
    return 1
