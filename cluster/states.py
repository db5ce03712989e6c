"""One state per attempt, from what SLURM says (queue + history) and what the trainer wrote.

SLURM alone cannot tell a preemption from a failure (a requeued step may end FAILED; a job whose
trainer stopped with a checkpoint may end COMPLETED). The trainer's ``status.json`` and exit status
75 can, so a preempted attempt is shown PREEMPTED or REQUEUED, never FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.local import LocalJob
from cluster.slurm import TERMINAL, SlurmJob

EXIT_PREEMPTED = 75
ACTIVE = frozenset({"PENDING", "REQUEUED", "RUNNING", "SUSPENDED"})
STATES = ("PENDING", "REQUEUED", "RUNNING", "SUSPENDED", "PREEMPTED", "TIMEOUT", "FAILED", "CANCELLED",
          "COMPLETED", "UNKNOWN")  # fmt: skip


@dataclass
class AttemptState:
    state: str
    reason: str = ""
    exit_code: int | None = None
    history: tuple[str, ...] = ()  # SLURM's states of the finished runs of this job id, oldest first

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


def slurm_state(job: SlurmJob, trainer: dict | None, cancelled: bool, recent: bool) -> AttemptState:
    history = tuple(h.state for h in job.history)
    q = (job.queue_state or "").upper()
    if q and q not in TERMINAL:
        if q in ("PENDING", "REQUEUE_HOLD", "REQUEUE_FED", "REQUEUED", "RESV_DEL_HOLD"):
            requeued = bool(history) or q.startswith("REQUEUE")
            return AttemptState("REQUEUED" if requeued else "PENDING", job.reason, None, history)
        if q in ("RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"):
            notes = [] if q == "RUNNING" else [q.lower()]
            if history:
                notes.append(f"restart {len(history)}")  # requeued under the same job id
            return AttemptState("RUNNING", ", ".join(notes), None, history)
        if q in ("SUSPENDED", "STOPPED"):
            return AttemptState("SUSPENDED", job.reason, None, history)
        return AttemptState(q, job.reason, None, history)
    last = job.history[-1] if job.history else None
    final = last.state.upper() if last else q
    code = last.exit_code if last else None
    if not final:
        return AttemptState("PENDING" if recent else "UNKNOWN", "" if recent else "not in squeue or sacct")
    preempted = code == EXIT_PREEMPTED or trainer_says(trainer, "preempted", job.job_id)
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
    if final == "FAILED":
        return AttemptState("FAILED", f"exit {code}" if code else "", code, history)
    return AttemptState("FAILED", final, code, history)  # NODE_FAIL, OUT_OF_MEMORY, BOOT_FAIL ...


def local_state(job: LocalJob | None, trainer: dict | None, cancelled: bool) -> AttemptState:
    if job is None:
        return AttemptState("UNKNOWN", "no local job record")
    if job.alive:
        return AttemptState("RUNNING")
    code = job.exit_code
    if code is None:
        return AttemptState("FAILED", "runner vanished without an exit status")
    if cancelled:
        return AttemptState("CANCELLED", "checkpoint committed" if code == EXIT_PREEMPTED else "", code)
    if code == 0:
        return AttemptState("COMPLETED", "", 0)
    if code == EXIT_PREEMPTED or trainer_says(trainer, "preempted", job.job_id):
        return AttemptState("PREEMPTED", "resume with: pixpro resume", code)
    return AttemptState("FAILED", f"exit {code}", code)


def follow_exit_code(state: AttemptState) -> int:
    """``--follow`` exits like the attempt: 0 completed, 75 preempted (resume me), else its failure."""
    if state.state == "COMPLETED":
        return 0
    if state.state == "PREEMPTED":
        return EXIT_PREEMPTED
    if state.exit_code not in (None, 0, EXIT_PREEMPTED):
        return int(state.exit_code)
    return 1
