"""The records the trainer and the node agents write beside a run (pydantic models), apart from
:mod:`schemas.contract`, which re-exports them on first use: ``pixpro status`` reads ``status.json`` and
the metrics as written and needs a model only for a running run's heartbeats or a node's failures, so
the contract's names and file layout come without building any model (nor importing pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from schemas.contract import EvalState, EvalTask, TrainerState


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # readers keep what a newer writer added


class TrainerStatus(_Record):
    """``status.json``: rewritten by rank 0 when an attempt starts and when it ends."""

    updated: float
    state: TrainerState
    step: int
    total_steps: int
    epoch: int
    attempt: str
    committed_step: int | None = None
    data_skips: int | None = None
    last_commit_s: float | None = None  # hand-over to 'latest' moved, of the newest commit
    last_commit_time: float | None = None  # wall clock of the newest commit
    store_error: str | None = None  # the checkpoint store's last failure, while it lasts
    preempt_committed: bool | None = None  # a preemption's final checkpoint made it within the lead time
    diverged: str | None = None  # why a diverged attempt stopped, in one line
    lr: float | None = None  # the schedule's at ``step`` (its last step's, as a metrics record has it)
    ema_momentum: float | None = None


class MetricsRecord(_Record):
    """One line of ``metrics/<attempt>.<chunk>.jsonl`` (every ``log_every_steps``)."""

    time: float
    attempt: str
    step: int
    epoch: int
    loss: float
    lr: float
    ema_momentum: float
    img_per_s: float
    positives: float
    total_steps: int
    resumed_from: int | None = None
    data_skips: int | None = None  # samples replaced by the next usable one so far in this attempt
    commit_s: float | None = None  # duration of the most recent committed checkpoint (hand-over to latest)
    store_error: str | None = None  # the checkpoint store is failing now (the last error)
    skipped_steps: int | None = None  # steps not applied (non-finite gradients) so far in this attempt
    steps_per_s: float | None = None  # over the last log interval: ``pixpro status`` estimates the end
    scaler_skipped_steps: int | None = None  # fp16 only: steps GradScaler skipped (expected) in this attempt
    # the kNN monitor's newest result and the step it was measured at, carried on every record after it
    # (a record with knn_step == step is the evaluation itself)
    knn_top1: float | None = None
    knn_top5: float | None = None
    knn_step: int | None = None


# -- heartbeats: hang detection ----------------------------------------------------------------------
class RankBeat(_Record):
    """One rank's newest heartbeat: what it last did (``phase`` at ``step``) and when."""

    rank: int
    pid: int
    step: int
    phase: str  # starting, train (step+1 in progress), monitor (the kNN monitor), checkpoint, final-flush
    time: float
    limit_s: float | None = None  # no progress for longer is a hang; None: not armed (before step 1)
    stopped: bool = False  # the process is stopped (SIGSTOP, a debugger): the OS says so


class NodeHeartbeat(_Record):
    """``heartbeats/<node>.json``: a node's ranks as its agent saw them at ``updated``."""

    node: str
    updated: float
    ranks: list[RankBeat]
    hang: str | None = None  # the watchdog's line, once it found a hung rank on this node
    hang_at: float | None = None  # when it acted: agents join a hang that recent, and stop ranks older


# -- node failures -----------------------------------------------------------------------------------
class NodeFailure(_Record):
    """One rank's failure on one node, blamed on the node."""

    node: str
    rank: int
    attempt: str
    cause: str  # one line: "killed by SIGKILL", "hang: ...", "CUDA error: ..."
    time: float


class EvalRequest(_Record):
    """What to evaluate and where it runs; the job reads it, only the login node writes it."""

    eval_id: str
    task: EvalTask
    data: str  # absolute path or URL: the job's working directory is the run's, not the user's
    seed: int = 0
    executor: str
    submitted: float
    after: str | None = None  # the run's job it waits for (SLURM afterok), "latest" for the run's latest
    # attempt whichever it is (a local sweep member not started yet); None: the latest checkpoint now
    job_id: str | None = None  # set once the executor took it
    resources: dict[str, int | str | None] = {}


class EvalResult(_Record):
    """Written by the job: ``running`` when it starts, then ``completed`` with the tool's result or
    ``failed`` with one error line."""

    state: EvalState
    started: float
    ended: float | None = None
    step: int | None = None  # the checkpoint's step that was evaluated
    result: dict | None = None  # the tool's whole result (``pixpro eval --json``)
    error: str | None = None
