"""The ``checkpoint``, ``resources``, ``logging`` and ``monitor`` sections: where state and metrics go, what
SLURM is asked for and what is measured on the side; a resume may change them (the spec hash leaves them
out)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import Field, StringConstraints, ValidationInfo, field_validator
from pydantic.json_schema import JsonValue

from schemas.spec.constants import MAX_STEPS, OWNED_SBATCH_OPTIONS, SBATCH_KEY_PATTERN, URL_SCHEMES
from schemas.spec.fields import (
    SbatchKey,
    SbatchValue,
    SlurmWord,
    SpecModel,
    StorageOptionValue,
    Url,
    check_required_url,
    check_url,
    fail,
    refuse_credentials,
)


class CheckpointSpec(SpecModel):
    """Where and how often training state is committed (see docs on the commit protocol)."""

    url: Url | None = Field(
        None,
        description="fsspec URL or local path of the checkpoint store, e.g. s3://bucket/prefix; "
        f"schemes: {', '.join(URL_SCHEMES)}. None = a local folder beside the run.",
    )
    every_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Commit every this many optimizer steps."
    )
    every_minutes: float | None = Field(
        10.0, gt=0, description="Commit when this many minutes passed since the last commit."
    )
    keep_last: int = Field(
        3, ge=1, le=10_000, description="Committed checkpoints kept; older ones are deleted."
    )
    storage_options: dict[str, StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec storage options (endpoint_url, client_kwargs, ...). Credentials (key, secret, "
        "token, password, aws_*) are refused: they come from the environment, never the spec.",
    )

    @field_validator("url")
    @classmethod
    def _supported_url(cls, value: str | None) -> str | None:
        return check_url(value)

    @field_validator("storage_options", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        return refuse_credentials(value)


class ResourceSpec(SpecModel):
    """What to ask SLURM for, and how the job is warned before it is stopped."""

    nodes: int = Field(1, ge=1, le=4096, description="Nodes; one torchrun per node.")
    gpus_per_node: int = Field(
        0, ge=0, le=64, description="GPUs (= trainer ranks) per node; 0 = one CPU rank."
    )
    cpus_per_task: int | None = Field(
        None, ge=1, le=4096, description="CPUs per node task (sbatch --cpus-per-task)."
    )
    mem_gb: int | None = Field(None, ge=1, le=1_048_576, description="Memory per node in GiB (sbatch --mem).")
    time_limit_min: int = Field(
        60 * 24, ge=1, le=366 * 24 * 60, description="Wall-clock limit per attempt, in minutes."
    )
    partition: SlurmWord | None = Field(None, description="SLURM partition(s).")
    account: SlurmWord | None = Field(None, description="SLURM account.")
    qos: SlurmWord | None = Field(None, description="SLURM quality of service.")
    constraint: SlurmWord | None = Field(None, description="SLURM node feature constraint.")
    signal: Literal["USR1", "USR2", "TERM", "INT", "HUP"] = Field(
        "USR2",
        description="Signal SLURM sends before the time limit; USR2 as submitit (NCCL may use USR1).",
    )
    signal_lead_s: int = Field(
        120,
        ge=10,
        le=366 * 24 * 3600,
        description="Seconds before the limit the signal arrives; < time_limit_min * 60.",
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="torchrun --max-restarts after a worker failure or a hang."
    )
    hang_timeout_s: int | None = Field(
        None,
        ge=30,
        le=7 * 24 * 3600,
        description="A rank that makes no progress (no step, no checkpoint phase) for this many seconds "
        "is hung: its node's agent dumps every rank's stack and restarts the group from the last "
        "checkpoint. None = 300 s (600 s for data on an object store). From the first step of each "
        "attempt on (before it: startup_timeout_s); the final flush has its own deadline. Collectives "
        "time out after this plus the final flush.",
    )
    startup_timeout_s: int = Field(
        1800,
        ge=60,
        le=7 * 24 * 3600,
        description="Before its attempt's first step is done (claiming the run, loading the checkpoint, "
        "listing the data, the monitor's set-up, the first step's compile), a rank that makes no progress "
        "for this many seconds is hung, as after it with hang_timeout_s: a filesystem or object store "
        "that stalls every rank at start-up ends in a restart, not in the job's whole time limit. "
        "Never less than hang_timeout_s; collectives wait this long for a rank that starts.",
    )
    extra_sbatch: dict[SbatchKey, SbatchValue] = Field(
        default_factory=dict,
        description='Extra sbatch long options without dashes, e.g. {"exclusive": "", "gres": '
        '"nvme:1"}; an empty value writes a bare flag. Options pixpro sets itself are refused.',
        json_schema_extra={
            "propertyNames": {
                "pattern": SBATCH_KEY_PATTERN,
                "not": {"enum": cast(list[JsonValue], sorted(OWNED_SBATCH_OPTIONS))},
            },
        },
    )

    @property
    def ranks(self) -> int:
        """Trainer processes in the job: one per GPU, or one per node on CPUs."""
        return self.nodes * max(self.gpus_per_node, 1)

    @field_validator("signal_lead_s")
    @classmethod
    def _lead_inside_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("time_limit_min")
        if limit is not None and value >= limit * 60:
            raise fail(
                "signal_lead_too_long",
                f"must be less than time_limit_min * 60 ({limit * 60} s)",
            )
        return value

    @field_validator("extra_sbatch", mode="before")
    @classmethod
    def _not_owned(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        owned = [k for k in value if isinstance(k, str) and k in OWNED_SBATCH_OPTIONS]
        if owned:
            raise fail(
                "sbatch_owned",
                "options set by pixpro are not allowed: "
                + "; ".join(f"{k!r} ({OWNED_SBATCH_OPTIONS[k]})" for k in owned),
            )
        return value


# -------------------------------------------------------------------------------------------- logging

_WANDB_WORD = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"  # W&B project/entity/group names: no paths, no URLs
_WANDB_TAG = r"^[A-Za-z0-9_.:=+-]{1,64}$"


class WandbSpec(SpecModel):
    """A Weights & Biases run mirroring the metrics (the ``pixpro[wandb]`` extra). Its run id is derived
    from the pixpro run id, so every attempt resumes the same W&B run; the API key comes from the
    environment (``WANDB_API_KEY`` or ``wandb login``), never the spec."""

    project: str = Field(pattern=_WANDB_WORD, description="W&B project.")
    entity: str | None = Field(None, pattern=_WANDB_WORD, description="W&B team or user; None = default.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline writes locally (upload later with `wandb sync`); disabled: nothing."
    )
    tags: list[Annotated[str, StringConstraints(pattern=_WANDB_TAG)]] = Field(
        default_factory=list, max_length=64, description="W&B run tags."
    )
    group: str | None = Field(None, pattern=_WANDB_WORD, description="W&B run group.")


class LoggingSpec(SpecModel):
    """Where rank 0 mirrors its metrics besides the JSON lines beside the checkpoints. A failing sink
    warns once and is dropped: it never stops training."""

    tensorboard: bool = Field(True, description="TensorBoard event files in the run folder's tensorboard/.")
    wandb: WandbSpec | None = Field(None, description="Weights & Biases run; None = no W&B.")


# -------------------------------------------------------------------------------------------- monitor


class MonitorSpec(SpecModel):
    """A weighted kNN classifier on the frozen online backbone, run inside the training job (the
    ``pixpro eval --task knn`` recipe on centre crops at data.crop_size): a label-based signal while a run
    trains. It reads, never changes, the training state: a run ends the same with or without it."""

    data: Url = Field(
        description="Labelled images: a folder of class sub-folders (held out: every fifth image of each "
        "class), train/ and val/ folders of them, a packed dataset of them (pixpro pack), or a demo-scenes "
        "folder; a local path or an fsspec URL (data.storage_options apply).",
    )
    every_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Evaluate at every multiple of this many optimizer steps."
    )
    every_epochs: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Evaluate at the end of every this many epochs; exactly one of every_steps and "
        "every_epochs.",
    )
    train_samples: int = Field(
        10_000,
        ge=2,
        le=1_000_000,
        description="Labelled training (reference) images, spread evenly over the split; fewer if it has "
        "fewer. Their centre crops are decoded once and kept in memory, split across the ranks.",
    )
    test_samples: int = Field(
        2_500, ge=1, le=1_000_000, description="Held-out images scored, spread evenly over the split."
    )
    k: int = Field(20, ge=1, le=1000, description="Nearest training images that vote.")
    temperature: float = Field(
        0.07, gt=0, le=10, description="Each vote is weighted by exp(cosine similarity / temperature)."
    )

    @field_validator("data")
    @classmethod
    def _data_url(cls, value: str) -> str:
        return check_required_url(value)

    @field_validator("every_epochs")
    @classmethod
    def _one_cadence(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "every_steps" not in info.data:  # every_steps itself failed: its own error says why
            return value
        if (value is None) == (info.data["every_steps"] is None):
            raise fail("monitor_cadence", "set exactly one of monitor.every_steps and monitor.every_epochs")
        return value
