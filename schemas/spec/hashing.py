"""The spec hash: which fields change the training result, so a resume with a different one is refused.

Run ids and checkpoints depend on it: the payload and its canonical JSON must never change for an
existing spec."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.spec.run import RunSpec

_HASH_EXCLUDE: dict[str, Any] = {
    "resources": True,
    "checkpoint": True,
    "log_every_steps": True,
    "logging": True,
    "threads": True,
    "deterministic": True,
    "monitor": True,
    "optim": {"max_nonfinite_steps"},
    "data": {"num_workers", "storage_options", "cache", "cache_gb", "cache_dir", "augment_on"},
}
"""Fields that do not change what is trained, so a resume may change them: resources (world size is
checked separately, from the checkpoint), where/how often checkpoints go, logging cadence and sinks,
DataLoader workers (augmentation is seeded per sample, not per worker), how data is reached and cached
(never what a sample is), where the photometric steps run (same views either way) and CPU threads (only
float rounding), deterministic kernels (only float rounding), when a diverging run gives up, and the kNN
monitor (it reads the weights, never changes them)."""


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
