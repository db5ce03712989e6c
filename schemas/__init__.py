"""Validated run specs for pixpro, importable without torch (the CLI checks specs on login nodes).

Everything downstream (the CLI, the sbatch script, the trainer, resume checks) reads a :class:`RunSpec`,
so mistakes are caught here, before a job waits hours in a queue. Unknown keys are errors everywhere
(a misspelt ``optim.lr`` must not silently fall back to a default), and every error is reported as one
line ``field.path: message (got value)`` so a user can fix a spec in one pass. Defaults are the official
PixPro 100-epoch recipe (see docs / pixpro-reference.md).

The public names of :mod:`schemas.spec` are re-exported here on first use: importing
:mod:`schemas.contract` (``pixpro status``) must not pay for building every spec model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.spec.constants import (
        ANNOTATION_KEYS,
        CREDENTIAL_KEYS,
        MAX_SPEC_BYTES,
        OWNED_SBATCH_OPTIONS,
        URL_SCHEMES,
    )
    from schemas.spec.data import (
        AffineSpec,
        DataSpec,
        DemoDataSpec,
        ElasticSpec,
        PerspectiveSpec,
        RotationSpec,
        SpatialTransformSpec,
    )
    from schemas.spec.errors import SpecError
    from schemas.spec.export import SCHEMA_PATH, json_schema, json_schema_text
    from schemas.spec.hashing import hash_payload, spec_hash
    from schemas.spec.load import load_spec, load_spec_data
    from schemas.spec.operations import CheckpointSpec, MonitorSpec, ResourceSpec
    from schemas.spec.parse import apply_overrides, parse_spec
    from schemas.spec.rules import CROSS_FIELD_RULES, hang_timeout_s, too_few_images
    from schemas.spec.run import RunSpec
    from schemas.spec.training import LossSpec, ModelSpec, OptimSpec

_HOMES = {
    "ANNOTATION_KEYS": "schemas.spec.constants",
    "AffineSpec": "schemas.spec.data",
    "CREDENTIAL_KEYS": "schemas.spec.constants",
    "CROSS_FIELD_RULES": "schemas.spec.rules",
    "CheckpointSpec": "schemas.spec.operations",
    "DataSpec": "schemas.spec.data",
    "DemoDataSpec": "schemas.spec.data",
    "ElasticSpec": "schemas.spec.data",
    "LossSpec": "schemas.spec.training",
    "MAX_SPEC_BYTES": "schemas.spec.constants",
    "ModelSpec": "schemas.spec.training",
    "MonitorSpec": "schemas.spec.operations",
    "OWNED_SBATCH_OPTIONS": "schemas.spec.constants",
    "OptimSpec": "schemas.spec.training",
    "PerspectiveSpec": "schemas.spec.data",
    "ResourceSpec": "schemas.spec.operations",
    "RotationSpec": "schemas.spec.data",
    "RunSpec": "schemas.spec.run",
    "SCHEMA_PATH": "schemas.spec.export",
    "SpatialTransformSpec": "schemas.spec.data",
    "SpecError": "schemas.spec.errors",
    "URL_SCHEMES": "schemas.spec.constants",
    "apply_overrides": "schemas.spec.parse",
    "hang_timeout_s": "schemas.spec.rules",
    "hash_payload": "schemas.spec.hashing",
    "json_schema": "schemas.spec.export",
    "json_schema_text": "schemas.spec.export",
    "load_spec": "schemas.spec.load",
    "load_spec_data": "schemas.spec.load",
    "parse_spec": "schemas.spec.parse",
    "spec_hash": "schemas.spec.hashing",
    "too_few_images": "schemas.spec.rules",
}
"""Each public name and the module of :mod:`schemas.spec` that defines it."""

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
    "MonitorSpec",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
