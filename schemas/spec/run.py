"""The run spec itself: the top-level document that holds every section."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from schemas.spec.constants import MAX_SEED, MAX_STEPS, MAX_THREADS, NAME_PATTERN
from schemas.spec.data import DataSpec
from schemas.spec.fields import SpecModel, fail
from schemas.spec.operations import CheckpointSpec, LoggingSpec, MonitorSpec, ResourceSpec
from schemas.spec.training import LossSpec, ModelSpec, OptimSpec


class RunSpec(SpecModel):
    """A PixPro pretraining run: data, model, loss, optimization, checkpoints and SLURM resources."""

    model_config = ConfigDict(
        title="PixPro run spec",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    name: str = Field(
        "pixpro",
        pattern=NAME_PATTERN,
        description="Run name: 1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or - (it "
        "becomes a folder, a job name and the start of the run id, a CLI argument).",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of sampling, augmentation and initialization.")
    data: DataSpec = Field(description="Images and views.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Backbone, projector and PPM.")
    loss: LossSpec = Field(default_factory=LossSpec, description="Pixel (and instance) loss.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and schedules.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="Autocast dtype; fp16 adds a GradScaler."
    )
    channels_last: bool = Field(
        True, description="channels_last memory format (on GPU; on CPU too with cpu_autocast)."
    )
    cpu_autocast: bool = Field(
        False,
        description="Apply precision (bf16 only) and channels_last on CPU ranks too: about 2.5x faster "
        "on CPUs with AMX or AVX512-BF16, slower on others; still bitwise reproducible.",
    )
    threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="torch threads per rank on CPU; None = torch's default."
    )
    deterministic: bool = Field(
        False,
        description="Deterministic CUDA kernels (torch.use_deterministic_algorithms, a fixed cuBLAS "
        "workspace, no cuDNN autotuning): a GPU run and its resume repeat bit for bit, somewhat slower. "
        "CPU runs are deterministic either way.",
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint store.")
    log_every_steps: int = Field(
        10, ge=1, le=MAX_STEPS, description="Log metrics every this many optimizer steps."
    )
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="TensorBoard and W&B mirrors.")
    monitor: MonitorSpec | None = Field(
        None,
        description="A kNN classifier on the online backbone every few steps or epochs, its top-1/top-5 in "
        "the metrics; None = no monitor.",
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="SLURM allocation.")

    @field_validator("cpu_autocast")
    @classmethod
    def _bf16_only_on_cpu(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("precision") == "fp16":
            raise fail("cpu_fp16", "needs precision 'bf16' or 'fp32' (CPU autocast has no fast fp16)")
        return value

    @field_validator("name")
    @classmethod
    def _not_dot_dir(cls, value: str) -> str:
        if value in (".", ".."):
            raise fail("name_dot", "must not be '.' or '..' (the name becomes a folder)")
        return value
