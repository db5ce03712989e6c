"""The ``model``, ``loss`` and ``optim`` sections: what is trained and how it is optimized."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic.functional_validators import BeforeValidator

from schemas.backbones import backbone, backbone_names
from schemas.spec.constants import MAX_STEPS
from schemas.spec.fields import SpecModel, fail, json_int


class ModelSpec(SpecModel):
    """Backbone, projector and pixel propagation module (PPM)."""

    backbone: str = Field(
        "resnet50",
        description="torchvision classification model name, cut at its last feature map "
        "(convolutional feature extractors only; list: schemas/backbones.json).",
        json_schema_extra={"enum": list(backbone_names())},
    )
    projector_hidden: int = Field(
        4096, ge=1, le=65536, description="Hidden channels of the 1x1-conv projector."
    )
    projector_out: int = Field(
        256, ge=1, le=65536, description="Output channels of the projector (and the PPM)."
    )
    ppm_gamma: float = Field(2.0, gt=0, le=100, description="Sharpness exponent of the PPM similarity.")
    ppm_layers: Annotated[Literal[0, 1, 2], BeforeValidator(json_int)] = Field(
        1, description="Layers of the PPM transform g: 0 = identity, 1 = conv1x1, 2 = conv-BN-ReLU-conv."
    )
    zero_init_residual: bool = Field(
        True, description="Zero-init the last BN gamma of every residual block, as the official code."
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if backbone(value) is not None:
            return value
        names = list(backbone_names())
        close = get_close_matches(value.lower(), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise fail(
            "backbone",
            f"not a torchvision convolutional backbone; {hint}e.g. resnet18, resnet50, convnext_tiny, "
            "regnet_y_400mf (all: schemas/backbones.json)",
        )


class LossSpec(SpecModel):
    """Which pixel loss, and the optional instance branch."""

    kind: Literal["pixpro", "pixcontrast"] = Field(
        "pixpro", description="pixpro = pixel-propagation consistency; pixcontrast = pixel InfoNCE."
    )
    positive_threshold: float = Field(
        0.7, gt=0, le=100, description="Cells closer than this many bin diagonals form positive pairs."
    )
    instance_weight: float = Field(
        0.0, ge=0, le=1e6, description="Weight of the instance (BYOL-style) branch."
    )
    pixcontrast_tau: float = Field(
        0.3,
        ge=1e-3,
        le=100,
        description="Temperature of the PixContrast InfoNCE loss, in [0.001, 100] (smaller ones overflow "
        "the logits to inf/NaN in fp16/bf16).",
    )


class OptimSpec(SpecModel):
    """Optimizer, learning-rate schedule and EMA target momentum."""

    optimizer: Literal["lars", "sgd"] = Field(
        "lars", description="LARS over SGD with momentum, or plain SGD."
    )
    base_lr: float = Field(1.0, gt=0, description="Learning rate per 256 images of global batch.")
    lr_scaling: Literal["linear", "sqrt"] = Field(
        "linear",
        description="Peak LR = base_lr * (global_batch / 256), or its square root for small batches.",
    )
    weight_decay: float = Field(1e-5, ge=0, description="Weight decay (not applied to 1-D parameters).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient.")
    epochs: int = Field(100, ge=1, le=1_000_000, description="Training epochs.")
    warmup_epochs: float = Field(
        5.0, ge=0, description="Linear warmup from lr/100, in epochs (may be fractional); < epochs."
    )
    final_lr: float = Field(1e-6, ge=0, description="Learning rate at the end of the cosine decay.")
    ema_base_momentum: float = Field(
        0.99, ge=0, lt=1, description="Starting EMA momentum of the target; rises to 1 on a cosine."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Cap on total optimizer steps (demos, tests); LR and EMA schedules use the capped total.",
    )
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        le=MAX_STEPS,
        description="Steps in a row with non-finite gradients (each one skipped, not applied) after which "
        "the run stops as diverged, without a restart or requeue (it would only repeat).",
    )

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_before_end(cls, value: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and value >= epochs:
            raise fail("warmup_too_long", f"must be less than epochs ({epochs})")
        return value
