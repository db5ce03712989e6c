"""The spec hash: stable, pinned, blind to what a resume may change, sensitive to the training recipe."""

from __future__ import annotations

import re
from typing import Any

import pytest

from schemas import (
    hash_payload,
    parse_spec,
    spec_hash,
)
from tests.support.specs import FULL, MINIMAL, with_value

# ----------------------------------------------------------------------------------------------- hash


def _reorder(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _reorder(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reorder(v) for v in obj]
    return obj


def test_spec_hash_is_stable_across_key_order_and_spelling() -> None:
    spec = parse_spec(FULL)
    assert spec_hash(parse_spec(_reorder(FULL))) == spec_hash(spec)
    assert re.fullmatch(r"[0-9a-f]{64}", spec_hash(spec))
    a = parse_spec(with_value(MINIMAL, "optim.warmup_epochs", 5))
    b = parse_spec(with_value(MINIMAL, "optim.warmup_epochs", 5.0))
    assert spec_hash(a) == spec_hash(b) == spec_hash(parse_spec(MINIMAL))
    explicit = parse_spec(MINIMAL).model_dump(mode="json")
    assert spec_hash(parse_spec(explicit)) == spec_hash(parse_spec(MINIMAL))


def test_spec_hash_of_the_defaults_is_pinned() -> None:
    # Changing this breaks resume of every existing checkpoint: only do it on purpose.
    assert (
        spec_hash(parse_spec(MINIMAL)) == "c645cfa85c3b78b13e33c2f93653bee6dc72eb4f7e3748a7463b2fe76f327e75"
    )


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("resources", {"nodes": 8, "gpus_per_node": 8, "partition": "big", "time_limit_min": 10}),
        ("checkpoint", {"url": "s3://other/p", "every_steps": 1, "every_minutes": None, "keep_last": 9}),
        ("checkpoint.storage_options", {"endpoint_url": "http://elsewhere"}),
        ("log_every_steps", 1),
        ("data.num_workers", 0),
        ("threads", 1),
        ("deterministic", True),
        ("monitor", None),
        ("monitor.every_epochs", 5),
    ],
)
def test_spec_hash_ignores_what_does_not_change_training(dotted: str, value: Any) -> None:
    assert spec_hash(parse_spec(with_value(FULL, dotted, value))) == spec_hash(parse_spec(FULL))


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("model.ppm_gamma", 1.0),
        ("model.backbone", "resnet50"),
        ("model.ppm_layers", 0),
        ("optim.base_lr", 2.0),
        ("optim.max_steps", 11),
        ("loss.kind", "pixpro"),
        ("data.crop_size", 48),
        ("data.spatial", []),
        ("seed", 4),
        ("precision", "bf16"),
        ("cpu_autocast", True),
    ],
)
def test_spec_hash_changes_with_the_training_recipe(dotted: str, value: Any) -> None:
    assert spec_hash(parse_spec(with_value(FULL, dotted, value))) != spec_hash(parse_spec(FULL))


def test_hash_payload_leaves_out_the_operational_fields() -> None:
    payload = hash_payload(parse_spec(FULL))
    assert {"resources", "checkpoint", "log_every_steps", "threads"}.isdisjoint(payload)
    assert "num_workers" not in payload["data"] and payload["model"]["backbone"] == "resnet18"


def test_logging_sinks_never_change_the_spec_hash() -> None:
    """Turning TensorBoard off or W&B on between attempts must not block the resume."""
    wandb = {"project": "pixpro", "entity": "lab", "mode": "offline", "tags": ["r50"], "group": "ablation"}
    changed = with_value(with_value(FULL, "logging.tensorboard", False), "logging.wandb", wandb)
    assert parse_spec(changed).logging.wandb.mode == "offline"  # type: ignore[union-attr]
    assert spec_hash(parse_spec(changed)) == spec_hash(parse_spec(FULL))
    assert "logging" not in hash_payload(parse_spec(changed))
