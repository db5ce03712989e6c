"""The run spec: one validated document that fully describes a PixPro pretraining run.

Everything downstream (the CLI, the sbatch script, the trainer, resume checks) reads a :class:`RunSpec`,
so mistakes are caught here, before a job waits hours in a queue. Unknown keys are errors everywhere
(a misspelt ``optim.lr`` must not silently fall back to a default), and every error is reported as one
line ``field.path: message (got value)`` so a user can fix a spec in one pass.

Defaults are the official PixPro 100-epoch recipe (see docs / pixpro-reference.md).

This module imports nothing from the rest of the project and never torch: the CLI validates specs on a
login node in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import reprlib
import types
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import BeforeValidator, PlainValidator
from pydantic.json_schema import JsonValue, WithJsonSchema
from pydantic_core import ErrorDetails, PydanticCustomError

from schemas.backbones import backbone, backbone_names
from schemas.contract import one_line
from schemas.secrets import is_secret_key, secret_paths

__all__ = [
    "ANNOTATION_KEYS",
    "CREDENTIAL_KEYS",
    "CROSS_FIELD_RULES",
    "MAX_SPEC_BYTES",
    "OWNED_SBATCH_OPTIONS",
    "SCHEMA_PATH",
    "URL_SCHEMES",
    "AffineSpec",
    "CheckpointSpec",
    "DataSpec",
    "DemoDataSpec",
    "ElasticSpec",
    "LossSpec",
    "ModelSpec",
    "OptimSpec",
    "PerspectiveSpec",
    "ResourceSpec",
    "RotationSpec",
    "RunSpec",
    "SpatialTransformSpec",
    "SpecError",
    "apply_overrides",
    "hang_timeout_s",
    "hash_payload",
    "json_schema",
    "json_schema_text",
    "load_spec",
    "load_spec_data",
    "parse_spec",
    "spec_hash",
    "too_few_images",
]

SCHEMA_PATH = Path(__file__).with_name("run_spec.schema.json")
"""The exported JSON Schema (package data); regenerate with ``python -m schemas --write``."""

CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        # the same thing for the other supported stores (gcsfs, adlfs)
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
    }
)
"""Examples of refused keys, kept for callers; the rule itself is :mod:`schemas.secrets` (normalised key
patterns and value shapes, anywhere in the spec): credentials never go into a spec, which is copied into
job records and logs."""

MAX_SPEC_BYTES = 256 * 1024
"""Largest spec, as a file and as JSON after YAML aliases are expanded: a spec is copied into the run
record, every attempt's log and error lines, so a 500-byte alias bomb must not become megabytes."""

_MAX_NODES = 20_000  # values in a spec after alias expansion (a real spec has about 100)
_MAX_KEY_SHOWN = 40
MAX_SEED = 2**32 - 1
"""Seeds are numpy/torch generator seeds; the trainer derives per-rank seeds as ``seed * 1000 + rank``."""
MAX_STEPS = 10**12 - 1
"""The checkpoint store names prefixes ``step-<12 digits>``."""
MAX_THREADS = 1024

URL_SCHEMES = ("file", "s3", "gs", "az", "memory")
"""Checkpoint URL schemes the checkpoint store supports (besides a plain path)."""

OWNED_SBATCH_OPTIONS: dict[str, str] = {
    "nodes": "set from resources.nodes",
    "ntasks": "pixpro runs one task per node",
    "ntasks-per-node": "pixpro runs one task per node",
    "gpus-per-node": "set from resources.gpus_per_node",
    "gpus": "set from resources.gpus_per_node",
    "signal": "set from resources.signal and resources.signal_lead_s",
    "requeue": "always set by pixpro",
    "no-requeue": "pixpro relies on requeue",
    "time": "set from resources.time_limit_min",
    "output": "pixpro writes logs beside the run",
    "error": "pixpro writes logs beside the run",
    "job-name": "set from name",
    "partition": "use resources.partition",
    "account": "use resources.account",
    "qos": "use resources.qos",
    "constraint": "use resources.constraint",
    "cpus-per-task": "use resources.cpus_per_task",
    "mem": "use resources.mem_gb",
}
"""sbatch long options pixpro writes itself; ``resources.extra_sbatch`` may not set them (a second,
conflicting value would silently win or break requeue/signal handling)."""

_MAX_NESTING = 16
_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"  # never an option (-x) or a hidden/dot folder
_SLURM_WORD_PATTERN = r"^[!-~]+$"  # printable ASCII without spaces (the same in every regex engine)
_SBATCH_KEY_PATTERN = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
_SBATCH_VALUE_PATTERN = r"^[^\x00-\x1f\x7f]*$"


@functools.cache
def _int_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Fields of ``model`` typed ``int`` or ``int | None``."""
    names = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        union = get_origin(ann) in (Union, types.UnionType)
        if ann is int or (union and int in get_args(ann)):
            names.append(name)
    return tuple(names)


def _kind_required(schema: dict[str, Any]) -> None:
    """pydantic picks a spatial transform by its ``kind`` key, so the schema requires it too."""
    schema["required"] = sorted({*schema.get("required", []), "kind"})


class _Spec(BaseModel):
    """Shared config: unknown keys are errors, NaN/inf are refused, defaults are validated too (so a
    default written as ``5`` is stored as ``5.0`` exactly like a user's ``5`` and hashes the same)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """``16.0`` is an integer to JSON Schema; strict mode alone would refuse it for an ``int`` field."""
        if not isinstance(data, dict):
            return data
        fixed = None
        for name in _int_fields(cls):
            value = data.get(name)
            if isinstance(value, float) and value.is_integer():
                fixed = fixed if fixed is not None else dict(data)
                fixed[name] = int(value)
        return data if fixed is None else fixed


def _fail(kind: str, message: str) -> PydanticCustomError:
    """A validation error with our own type name and a finished message (no "Value error, " prefix)."""
    return PydanticCustomError(kind, message)  # no context: braces in the message stay literal


def _list_to_tuple(value: Any) -> Any:
    """JSON and YAML have no tuples: a 2-element array is the pair (strict mode would refuse a list)."""
    return tuple(value) if isinstance(value, list) else value


def _json_int(value: Any) -> Any:
    """An integer as JSON Schema means it: ``16`` or ``16.0``, never ``true``, ``"16"`` or ``16.5``
    (strict mode alone would refuse ``16.0``, which the exported schema accepts)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("int_type", "Input should be a valid integer")
    return value


_Pair = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]


def _check_range_pair(value: tuple[float, float], lo_min: float, hi_max: float | None) -> tuple[float, float]:
    lo, hi = value
    if not lo > lo_min:
        raise _fail("range_pair", f"lower bound must be > {lo_min}")
    if hi < lo:
        raise _fail("range_pair", "lower bound must be <= upper bound")
    if hi_max is not None and hi > hi_max:
        raise _fail("range_pair", f"upper bound must be <= {hi_max}")
    return value


# ----------------------------------------------------------------------------------------------- data


class DemoDataSpec(_Spec):
    """A synthetic dataset, so a demo or a test runs without downloading images."""

    num_images: int = Field(512, ge=1, le=1_000_000, description="Number of synthetic images to generate.")
    image_size: int = Field(
        160, ge=16, le=4096, description="Side length in pixels of each generated image; >= data.crop_size."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the generator; same seed, same images.")


class RotationSpec(_Spec):
    """Random rotation by an angle drawn uniformly from [-degrees, degrees]."""

    model_config = ConfigDict(json_schema_extra=_kind_required)

    kind: Literal["rotation"] = Field("rotation", description="Transform type tag.")
    degrees: float = Field(ge=0, le=180, description="Maximum absolute rotation angle in degrees.")


class AffineSpec(_Spec):
    """Random affine warp (torchvision RandomAffine semantics)."""

    model_config = ConfigDict(json_schema_extra=_kind_required)

    kind: Literal["affine"] = Field("affine", description="Transform type tag.")
    degrees: float = Field(ge=0, le=180, description="Maximum absolute rotation angle in degrees.")
    translate: _Pair = Field(
        (0.0, 0.0),
        description="Maximum horizontal and vertical shift as fractions of the image size, each in [0, 1].",
    )
    scale: _Pair = Field((1.0, 1.0), description="Range (lo, hi) of the scale factor, 0 < lo <= hi.")
    shear: float = Field(0.0, ge=0, lt=90, description="Maximum absolute x-shear angle in degrees.")

    @field_validator("translate")
    @classmethod
    def _translate_in_unit(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= v <= 1.0 for v in value):
            raise _fail("translate_range", "each translate fraction must be in [0, 1]")
        return value

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _check_range_pair(value, 0.0, None)


class PerspectiveSpec(_Spec):
    """Random perspective distortion (torchvision RandomPerspective semantics and defaults)."""

    model_config = ConfigDict(json_schema_extra=_kind_required)

    kind: Literal["perspective"] = Field("perspective", description="Transform type tag.")
    distortion_scale: float = Field(0.5, ge=0, le=1, description="How far corners may move, in [0, 1].")
    p: float = Field(0.5, ge=0, le=1, description="Probability of applying the distortion.")


class ElasticSpec(_Spec):
    """Random elastic warp (torchvision ElasticTransform semantics and defaults)."""

    model_config = ConfigDict(json_schema_extra=_kind_required)

    kind: Literal["elastic"] = Field("elastic", description="Transform type tag.")
    alpha: float = Field(50.0, ge=0, description="Magnitude of the displacement field, in pixels.")
    sigma: float = Field(5.0, gt=0, description="Smoothness (Gaussian sigma) of the displacement field.")


SpatialTransformSpec = Annotated[
    Union[RotationSpec, AffineSpec, PerspectiveSpec, ElasticSpec],  # noqa: UP007 (explicit union for the tag)
    Field(discriminator="kind"),
]
"""One general spatial transform, selected by ``kind``; pixel correspondences are tracked through it."""


class DataSpec(_Spec):
    """Where images come from and how the two views are cropped."""

    root: str = Field(
        min_length=1,
        max_length=4096,
        description="Training images: a folder (searched recursively) or a packed dataset (pixpro pack), "
        f"as a local path or an fsspec URL ({', '.join(s + '://' for s in URL_SCHEMES)}).",
    )
    storage_options: dict[str, _StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec storage options for a data.root URL (endpoint_url, client_kwargs, ...); "
        "credentials are refused: they come from the environment, as for checkpoints.",
    )
    cache: Literal["none", "memory", "disk"] = Field(
        "none",
        description="Keep the encoded bytes of samples once read: memory (per loader process) or disk "
        "(cache_dir on node-local storage, shared by the node's ranks); bounded by cache_gb.",
    )
    cache_gb: float = Field(8.0, gt=0, le=1e6, description="Size bound of the cache, in GB.")
    cache_dir: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Node-local folder of the disk cache (default: $TMPDIR/pixpro-cache/<run name>).",
    )
    demo: DemoDataSpec | None = Field(
        None,
        description="If set, a synthetic demo dataset is generated into root when root does not exist.",
    )
    crop_size: int = Field(
        224,
        ge=32,
        le=4096,
        description="Side length in pixels of each random-resized crop; the backbone's last feature map "
        "must be at least 2x2 (e.g. >= 33 for ResNets, >= 64 for ConvNeXt and VGG).",
    )
    crop_scale: _Pair = Field(
        (0.08, 1.0),
        description="RandomResizedCrop area fraction range (lo, hi), 0 < lo <= hi <= 1; the official "
        "scripts pass 0.08 although the option default is 0.2.",
    )
    spatial: list[SpatialTransformSpec] = Field(
        default_factory=list,
        description="Extra spatial transforms after crop and flip, in order; pixels brought in from "
        "outside the image are marked invalid and never pair.",
    )
    batch_size: int = Field(
        128,
        ge=2,
        le=65536,
        description="Images per rank per optimizer step; >= 2 (the projector's BatchNorm always trains).",
    )
    num_workers: int = Field(8, ge=0, le=256, description="DataLoader worker processes per rank.")
    augment_on: Literal["worker", "device"] = Field(
        "worker",
        description="Where colour jitter, grey, blur and solarize run: in the DataLoader workers, or batched "
        "on the training device (workers then only decode, crop and flip, and send uint8 views). The views "
        "are the same either way (bitwise on CPU); 'device' needs about half the CPU cores per GPU.",
    )

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _check_range_pair(value, 0.0, 1.0)

    @field_validator("root")
    @classmethod
    def _root_url(cls, value: str) -> str:
        checked = _check_url(value)
        assert checked is not None
        return checked

    @field_validator("storage_options", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        return _refuse_credentials(value)


# ------------------------------------------------------------------------------------ model and loss


class ModelSpec(_Spec):
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
    ppm_layers: Annotated[Literal[0, 1, 2], BeforeValidator(_json_int)] = Field(
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
        raise _fail(
            "backbone",
            f"not a torchvision convolutional backbone; {hint}e.g. resnet18, resnet50, convnext_tiny, "
            "regnet_y_400mf (all: schemas/backbones.json)",
        )


class LossSpec(_Spec):
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


# ------------------------------------------------------------------------------------------ optimizer


class OptimSpec(_Spec):
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
            raise _fail("warmup_too_long", f"must be less than epochs ({epochs})")
        return value


# ----------------------------------------------------------------------------------------- checkpoint


def _storage_value(value: Any, depth: int = 0) -> Any:
    """Accept JSON data only: storage_options go to fsspec and into job records, both need JSON."""
    if depth > _MAX_NESTING:
        raise _fail("nested_too_deep", f"nested more than {_MAX_NESTING} levels")
    if value is None and depth > 0:
        return None
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail("finite_number", "Input should be a finite number")
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise _fail("invalid_key", "object keys must be strings")
        return {k: _storage_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth > 0:
        return [_storage_value(v, depth + 1) for v in value]
    expected = "a string, number, boolean or object" if depth == 0 else "JSON data"
    raise _fail("storage_option_type", f"Input should be {expected}")


_StorageOptionValue = Annotated[
    Any,
    PlainValidator(_storage_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "integer"},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "object"},
            ]
        }
    ),
]


def _contains_credentials(value: Any) -> bool:
    """Whether an error's input may hold a secret (the one policy of :mod:`schemas.secrets`)."""
    return bool(secret_paths(value))


def _refuse_credentials(value: Any) -> Any:
    """storage_options: before the type checks, so a credential is refused even when another option is
    malformed (parse_spec refuses them for the whole spec first; this guards direct model validation)."""
    if secret_paths(value):
        raise _fail("credentials", _CREDENTIALS_HINT)
    return value


def _check_url(value: str | None) -> str | None:
    """A plain path, or a URL of a supported scheme without user-info (credentials come from the
    environment) and with a bucket where the scheme needs one."""
    if value is None:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _fail("url_control_chars", "must not contain control characters")
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)\Z", value, re.DOTALL)
    if match is None:
        return value  # a plain local path
    scheme, rest = match.group(1), match.group(2)
    if scheme.lower() not in URL_SCHEMES:
        raise _fail(
            "url_scheme",
            f"unsupported scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)} or a plain path",
        )
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        raise _fail(
            "credentials",
            "must not embed user info (user[:secret]@); credentials come from the environment",
        )
    if scheme.lower() in ("s3", "gs", "az") and not netloc:
        raise _fail("url_bucket", f"{scheme}:// URL needs a bucket or container")
    return value


class CheckpointSpec(_Spec):
    """Where and how often training state is committed (see docs on the commit protocol)."""

    url: _Url | None = Field(
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
    storage_options: dict[str, _StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec storage options (endpoint_url, client_kwargs, ...). Credentials (key, secret, "
        "token, password, aws_*) are refused: they come from the environment, never the spec.",
    )

    @field_validator("url")
    @classmethod
    def _supported_url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("storage_options", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        return _refuse_credentials(value)


# ------------------------------------------------------------------------------------------ resources


def _number_to_str(value: Any) -> Any:
    """YAML reads ``nice: 10`` as an int; sbatch values are text either way (``10.0`` is an integer to
    JSON Schema, so it is ``10`` here too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


_SbatchKey = Annotated[str, StringConstraints(pattern=_SBATCH_KEY_PATTERN)]
_SbatchValue = Annotated[
    str,
    StringConstraints(pattern=_SBATCH_VALUE_PATTERN, max_length=1024),
    BeforeValidator(_number_to_str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SBATCH_VALUE_PATTERN, "maxLength": 1024},
                {"type": "integer"},
            ]
        }
    ),
]
_SlurmWord = Annotated[str, StringConstraints(pattern=_SLURM_WORD_PATTERN, max_length=256)]
_Url = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 4096,
            "pattern": r"^(?:(?:[Ff][Ii][Ll][Ee]|[Ss]3|[Gg][Ss]|[Aa][Zz]|[Mm][Ee][Mm][Oo][Rr][Yy])://"
            r"|(?![A-Za-z][A-Za-z0-9+.-]*://))",
        }
    ),
]


class ResourceSpec(_Spec):
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
    partition: _SlurmWord | None = Field(None, description="SLURM partition(s).")
    account: _SlurmWord | None = Field(None, description="SLURM account.")
    qos: _SlurmWord | None = Field(None, description="SLURM quality of service.")
    constraint: _SlurmWord | None = Field(None, description="SLURM node feature constraint.")
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
        "checkpoint. None = 300 s (600 s for data on an object store). Armed after the first step of "
        "each attempt (compile, cold cache and checkpoint load do not count); the final flush has its "
        "own deadline. Collectives time out after this plus the final flush.",
    )
    extra_sbatch: dict[_SbatchKey, _SbatchValue] = Field(
        default_factory=dict,
        description='Extra sbatch long options without dashes, e.g. {"exclusive": "", "gres": '
        '"nvme:1"}; an empty value writes a bare flag. Options pixpro sets itself are refused.',
        json_schema_extra={
            "propertyNames": {
                "pattern": _SBATCH_KEY_PATTERN,
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
            raise _fail(
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
            raise _fail(
                "sbatch_owned",
                "options set by pixpro are not allowed: "
                + "; ".join(f"{k!r} ({OWNED_SBATCH_OPTIONS[k]})" for k in owned),
            )
        return value


# -------------------------------------------------------------------------------------------- logging

_WANDB_WORD = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"  # W&B project/entity/group names: no paths, no URLs
_WANDB_TAG = r"^[A-Za-z0-9_.:=+-]{1,64}$"


class WandbSpec(_Spec):
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


class LoggingSpec(_Spec):
    """Where rank 0 mirrors its metrics besides the JSON lines beside the checkpoints. A failing sink
    warns once and is dropped: it never stops training."""

    tensorboard: bool = Field(True, description="TensorBoard event files in the run folder's tensorboard/.")
    wandb: WandbSpec | None = Field(None, description="Weights & Biases run; None = no W&B.")


# ------------------------------------------------------------------------------------------- the run


class RunSpec(_Spec):
    """A PixPro pretraining run: data, model, loss, optimization, checkpoints and SLURM resources."""

    model_config = ConfigDict(
        title="PixPro run spec",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    name: str = Field(
        "pixpro",
        pattern=_NAME_PATTERN,
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
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="SLURM allocation.")

    @field_validator("cpu_autocast")
    @classmethod
    def _bf16_only_on_cpu(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("precision") == "fp16":
            raise _fail("cpu_fp16", "needs precision 'bf16' or 'fp32' (CPU autocast has no fast fp16)")
        return value

    @field_validator("name")
    @classmethod
    def _not_dot_dir(cls, value: str) -> str:
        if value in (".", ".."):
            raise _fail("name_dot", "must not be '.' or '..' (the name becomes a folder)")
        return value


_CREDENTIALS_RULE = "credentials come from the environment or a named profile, never the spec"
_CREDENTIALS_HINT = f"looks like a credential; {_CREDENTIALS_RULE}"

CROSS_FIELD_RULES: dict[str, str] = {
    "optim.warmup_epochs": "less than optim.epochs",
    "resources.signal_lead_s": "less than resources.time_limit_min * 60",
    "cpu_autocast": "not with precision fp16",
    "data.crop_size": "at least the backbone's min_crop (last feature map at least 2x2)",
    "data.demo.image_size": "at least data.crop_size",
    "data.demo.num_images": "at least one global batch (data.batch_size x resources ranks)",
    "data.demo": "only with a local data.root",
    "data.cache_dir": "a local path",
    "data.root": "no user info, a bucket for object stores",
    "data.crop_scale": "0 < lo <= hi <= 1",
    "data.spatial": "scale 0 < lo <= hi; translate fractions in [0, 1]",
    "checkpoint.url": "no user info, a bucket for object stores",
    "name": "not '.' or '..'",
}
"""Rules the exported JSON Schema cannot express (relations between fields, tables, URL parts), by the
field path an error names; besides these, credentials are refused anywhere (:mod:`schemas.secrets`).
Everything else the validator and the schema decide alike (tested by generating specs from the schema)."""


def too_few_images(spec: RunSpec, images: int, ranks: int) -> str:
    """The one line the validator, the preflight and the trainer all give a data set smaller than one
    global batch: the sampler drops the last partial batch, so such a run has no step to train."""
    field = "data.demo.num_images" if spec.data.demo is not None else "data.root"
    batch = spec.data.batch_size
    return (
        f"{field}: {images} images are fewer than one global batch of {batch * ranks} "
        f"(data.batch_size {batch} x {ranks} rank{'s' if ranks > 1 else ''})"
    )


def _model_problems(spec: RunSpec) -> list[str]:
    """Checks that need the backbone table: what would otherwise crash the trainer after queueing."""
    problems: list[str] = []
    info = backbone(spec.model.backbone)
    crop = spec.data.crop_size
    if info is not None and crop < info.min_crop:
        problems.append(
            f"data.crop_size: {crop} px is too small for {spec.model.backbone} (output stride "
            f"{info.stride}): its last feature map would be smaller than 2x2; use at least {info.min_crop}"
        )
    demo = spec.data.demo
    if demo is not None and demo.image_size < crop:
        problems.append(
            f"data.demo.image_size: {demo.image_size} px demo images are smaller than data.crop_size "
            f"({crop}); the loader would skip every image"
        )
    if demo is not None and demo.num_images < spec.data.batch_size * spec.resources.ranks:
        problems.append(too_few_images(spec, demo.num_images, spec.resources.ranks))
    if demo is not None and "://" in spec.data.root and not spec.data.root.lower().startswith("file://"):
        problems.append("data.demo: the demo dataset is generated into a local data.root, not a URL")
    if spec.data.cache_dir is not None and "://" in spec.data.cache_dir:
        problems.append("data.cache_dir: the disk cache lives on node-local storage: a local path")
    return problems


# ------------------------------------------------------------------------------------------- hashing

_HASH_EXCLUDE: dict[str, Any] = {
    "resources": True,
    "checkpoint": True,
    "log_every_steps": True,
    "logging": True,
    "threads": True,
    "deterministic": True,
    "optim": {"max_nonfinite_steps"},
    "data": {"num_workers", "storage_options", "cache", "cache_gb", "cache_dir", "augment_on"},
}
"""Fields that do not change what is trained, so a resume may change them: resources (world size is
checked separately, from the checkpoint), where/how often checkpoints go, logging cadence and sinks,
DataLoader workers (augmentation is seeded per sample, not per worker), how data is reached and cached
(never what a sample is), where the photometric steps run (same views either way) and CPU threads (only
float rounding), deterministic kernels (only float rounding) and when a diverging run gives up."""


_ADDED_LATER: dict[str, Any] = {"cpu_autocast": False}
"""Fields added after checkpoints existed: left out of the hash at these defaults, so those checkpoints
still resume."""


def hash_payload(spec: RunSpec) -> dict[str, Any]:
    """The part of the spec :func:`spec_hash` covers, as JSON data (to show what changed on a refusal)."""
    payload = spec.model_dump(mode="json", exclude=_HASH_EXCLUDE)
    for key, default in _ADDED_LATER.items():
        if payload.get(key) == default:
            del payload[key]
    return payload


DEFAULT_HANG_TIMEOUT_S = 300
"""Between two steps after the first: a data loader refilling at an epoch start, a checkpoint's
hand-over to the uploader, a metrics flush. Object-store data doubles it (slow reads on a cold cache)."""


def hang_timeout_s(spec: RunSpec) -> int:
    """``resources.hang_timeout_s``, or its default for what this run reads."""
    if spec.resources.hang_timeout_s is not None:
        return spec.resources.hang_timeout_s
    remote = "://" in spec.data.root and not spec.data.root.lower().startswith("file://")
    return 2 * DEFAULT_HANG_TIMEOUT_S if remote else DEFAULT_HANG_TIMEOUT_S


def spec_hash(spec: RunSpec) -> str:
    """sha256 hex of the canonical JSON of the fields that change the training result.

    A checkpoint stores it; a resume with a different hash would silently train a different run, so
    it is refused. Left out (see ``_HASH_EXCLUDE``) is what a requeued or moved run may legitimately
    change: resources, checkpoint location/cadence/options, logging cadence, DataLoader workers and
    CPU threads. Threads only change float rounding, so bitwise resume tests must pin them
    themselves. Input key order and int-vs-float spelling do not matter (the validated model is
    dumped with sorted keys).
    """
    canonical = json.dumps(hash_payload(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a run spec, for editors and docs; ``$schema``/``$comment`` are
    allowed so a spec file can point an editor at this schema and say what it is for."""
    schema = RunSpec.model_json_schema()
    annotations = {
        "$schema": {"type": "string", "description": "Where editors find this schema (ignored by pixpro)."},
        "$comment": {"type": "string", "description": "Free text for readers (ignored by pixpro)."},
    }
    schema["properties"] = {**annotations, **schema["properties"]}
    return schema


def json_schema_text() -> str:
    """The exact text of ``run_spec.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=True) + "\n"


# -------------------------------------------------------------------------------------------- errors


class SpecError(ValueError):
    """An invalid spec; ``str()`` is one line per problem, ``problems`` the same as a list."""

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = problems.splitlines()
        cleaned = [one_line(p) for p in problems]  # a problem is exactly one short line
        self.problems: list[str] = [p for p in dict.fromkeys(cleaned) if p] or ["invalid spec"]
        super().__init__("\n".join(self.problems))


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 5
_REPR.maxlevel = 3
_MAX_GOT = 80
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NO_GOT = frozenset({"missing", "credentials", "union_tag_not_found"})


def _short_repr(value: Any) -> str:
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real problem
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_GOT else text[: _MAX_GOT - 3] + "..."


def _node_for(annotation: Any) -> Any:
    """Model class, a {tag: model} dict for a discriminated union, or None for plain values."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _node_for(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _node_for(args[0])
        nodes = [_node_for(a) for a in args]
        if all(isinstance(n, type) and issubclass(n, BaseModel) and "kind" in n.model_fields for n in nodes):
            return {n.model_fields["kind"].default: n for n in nodes}
        return None
    if origin is list:
        return _node_for(get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _fmt_key(key: Any, first: bool) -> str:
    if isinstance(key, str) and len(key) > _MAX_KEY_SHOWN:
        return f"[{key[: _MAX_KEY_SHOWN - 10]!r}...]"  # a megabyte-long key is not echoed whole
    if isinstance(key, str) and _KEY_RE.fullmatch(key):
        return key if first else f".{key}"
    return f"[{_short_repr(key)}]"


def _render_loc(loc: tuple[Any, ...]) -> tuple[str, Any, bool]:
    """Dotted path of an error location, the model that holds its last key, and whether the error is
    about a dict key itself. Discriminator tags that pydantic inserts are dropped."""
    node: Any = RunSpec
    parent: Any = None
    text = ""
    is_key = False
    for i, seg in enumerate(loc):
        if seg == "[key]" and i == len(loc) - 1:
            is_key = True
            break
        if isinstance(node, dict) and seg in node:
            node = node[seg]  # discriminator tag, not a key of the input
            continue
        parent = node
        if isinstance(seg, int) and not isinstance(node, type):
            text += f"[{seg}]"
            continue
        text += _fmt_key(seg, not text)
        if isinstance(node, type) and issubclass(node, BaseModel) and seg in node.model_fields:
            node = _node_for(node.model_fields[seg].annotation)
        else:
            node = None
    return text or "spec", parent, is_key


def _suggest(key: str, allowed: list[str]) -> str | None:
    """The field a misspelt key most likely meant: a near spelling, or a field that has the key as a
    word (``lr`` -> ``base_lr``)."""
    close = get_close_matches(key, allowed, n=1)
    if close:
        return close[0]
    words = [f for f in allowed if key.lower() in f.split("_")]
    return words[0] if len(words) == 1 else None


def _error_line(err: ErrorDetails | dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    path, parent, is_key = _render_loc(loc)
    kind = err.get("type", "")
    message = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        message = "unknown key"
        if isinstance(parent, type) and issubclass(parent, BaseModel) and loc:
            allowed = list(parent.model_fields)
            close = _suggest(str(loc[-1]), allowed)
            message += f"; did you mean {close!r}?" if close else f" (allowed: {', '.join(allowed)})"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected an object (mapping)"
    elif kind == "union_tag_not_found":
        message = "missing 'kind' (one of: rotation, affine, perspective, elastic)"
    if is_key:
        message = f"invalid key: {message}"
    secret = kind in _NO_GOT or any(is_secret_key(s) for s in loc)
    value = err.get("input")
    if secret or _contains_credentials(value):
        return f"{path}: {message}"
    return f"{path}: {message} (got {_short_repr(value)})"


def _validation_problems(exc: ValidationError) -> list[str]:
    return [_error_line(e) for e in exc.errors(include_url=False)]


ANNOTATION_KEYS = frozenset({"$schema", "$comment"})


def _expanded_size(value: Any, memo: dict[int, tuple[int, int]], depth: int = 0) -> tuple[int, int]:
    """(approximate JSON bytes, values) of ``value`` with every YAML alias expanded, without expanding:
    a shared node is measured once and counted as often as it is referenced."""
    key = id(value)
    if key in memo:
        return memo[key]
    if depth > 64:
        raise SpecError(["spec: nested too deeply"])
    if isinstance(value, dict):
        size, count = 2, 1
        for k, v in value.items():
            sub = _expanded_size(v, memo, depth + 1)
            size, count = size + len(str(k)) + 4 + sub[0], count + 1 + sub[1]
    elif isinstance(value, (list, tuple)):
        size, count = 2, 1
        for v in value:
            sub = _expanded_size(v, memo, depth + 1)
            size, count = size + 2 + sub[0], count + sub[1]
    elif isinstance(value, str):
        size, count = len(value) + 2, 1
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        size, count = 41, 1  # never str() a huge int (Python refuses above 4300 digits)
    else:
        size, count = len(repr(value)), 1
    if isinstance(value, (dict, list, tuple)):
        memo[key] = (size, count)
    return size, count


def _check_size(obj: Any, where: str) -> None:
    size, count = _expanded_size(obj, {})
    if size > MAX_SPEC_BYTES or count > _MAX_NODES:
        raise SpecError(
            [
                f"{where}: too large (about {size // 1024} KiB, {count} values with YAML aliases "
                f"expanded; at most {MAX_SPEC_BYTES // 1024} KiB and {_MAX_NODES} values)"
            ]
        )


def parse_spec(obj: Any) -> RunSpec:
    """Validate already-loaded data (a dict) into a :class:`RunSpec`, or raise :class:`SpecError`.

    Order matters: size first (an alias bomb must not be walked), then credentials anywhere (a spec
    holding one is refused without echoing any of its values), then types and ranges, then the checks
    that need the backbone table.
    """
    if not isinstance(obj, dict):
        raise SpecError([f"spec: top level must be an object (mapping), got {type(obj).__name__}"])
    _check_size(obj, "spec")
    secrets = secret_paths(obj)
    if secrets:
        raise SpecError(
            [f"{_shorten_path(p)}: {why} is not allowed: {_CREDENTIALS_RULE}" for p, why in secrets]
        )
    # Editors' "$schema" and authors' "$comment" annotate the file; they are not part of the run.
    bad = [k for k in ANNOTATION_KEYS if k in obj and not isinstance(obj[k], str)]
    if bad:
        raise SpecError([f"{k}: must be a string (got {type(obj[k]).__name__})" for k in sorted(bad)])
    obj = {k: v for k, v in obj.items() if k not in ANNOTATION_KEYS}
    try:
        spec = RunSpec.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(_validation_problems(exc)) from None
    except RecursionError:
        raise SpecError(["spec: nested too deeply"]) from None
    problems = _model_problems(spec)
    if problems:
        raise SpecError(problems)
    return spec


def _shorten_path(path: str) -> str:
    parts = path.split(".")
    return ".".join(p if len(p) <= _MAX_KEY_SHOWN else p[: _MAX_KEY_SHOWN - 3] + "..." for p in parts)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c=value`` overrides applied (``--set``); a value is JSON when it
    parses as JSON (``16``, ``true``, ``[0.2, 1.0]``, ``null``), else the text itself. Validation comes
    after, exactly as for the file, so ``--set data.batch_size=x`` fails like ``"batch_size": "x"``."""
    out = json.loads(json.dumps(data)) if overrides else data
    for item in overrides:
        shown = one_line(item, 80)
        dotted, eq, text = str(item).partition("=")
        parts = dotted.strip().split(".")
        if not eq or not all(parts):
            raise SpecError([f"--set {shown}: expected KEY.PATH=VALUE, e.g. data.batch_size=16"])
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise SpecError([f"--set {shown}: {_shorten_path(where)}: no such list index"])
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError([f"--set {shown}: {_shorten_path(where)}: parent is not an object"])
    return out


# ------------------------------------------------------------------------------------------- loading


def _reject_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


@functools.cache
def _yaml_loader() -> type:
    """SafeLoader that refuses duplicate keys (YAML would silently keep the last one)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            except TypeError:
                continue  # unhashable: construct_mapping reports it with its position
        loader.flatten_mapping(node)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    # YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-5`` as a string, which strict types would refuse.
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return StrictLoader


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        detail = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise SpecError([f"{where}{pos}: invalid YAML: {_one_line(detail)}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"{where}: invalid YAML: {_one_line(str(exc))}"]) from None
    except RecursionError:
        raise SpecError([f"{where}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp like 2024-13-45
        raise SpecError([f"{where}: invalid YAML: {_one_line(str(exc))}"]) from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_pairs)
    except json.JSONDecodeError as exc:
        raise SpecError([f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except _DuplicateKey as exc:
        raise SpecError([f"{where}: invalid JSON: duplicate key {exc.args[0]!r}"]) from None
    except RecursionError:
        raise SpecError([f"{where}: invalid JSON: nested too deeply"]) from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise SpecError([f"{where}: invalid JSON: {_one_line(str(exc))}"]) from None


def load_spec_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a spec file (YAML for .yaml/.yml, else JSON) into data, not yet validated. Every problem
    with the path or its contents (missing, a folder, unreadable, a name too long, too large, not UTF-8,
    bad syntax) is a :class:`SpecError` of one line."""
    p = Path(path)
    where = one_line(p, 120)
    try:
        if not p.is_file():
            raise SpecError([f"{where}: {'not a file' if p.exists() else 'no such file'}"])
        with p.open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{where}: cannot read: {_one_line(exc.strerror or str(exc))}"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{where}: larger than {MAX_SPEC_BYTES // 1024} KiB; a run spec is a few KiB"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{where}: not UTF-8 text ({_one_line(exc.reason)} at byte {exc.start})"]) from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    data = _parse_yaml(text, where) if is_yaml else _parse_json(text, where)
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise SpecError([f"{where}: top level must be an object (mapping), got {kind}"])
    _check_size(data, where)
    return data


def load_spec(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a spec file, apply ``--set`` overrides and validate it, or raise :class:`SpecError`."""
    return parse_spec(apply_overrides(load_spec_data(path), overrides))
