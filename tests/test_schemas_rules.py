"""Run spec rules between fields and against the backbone table, and the values a spec implies."""

from __future__ import annotations

import json

import pytest

from schemas import (
    hang_timeout_s,
    parse_spec,
)
from tests.support.specs import MINIMAL, errors_of, with_value

# ------------------------------------------------------------------------------------- between fields


def test_cpu_autocast_refuses_fp16() -> None:
    lines = errors_of(with_value(with_value(MINIMAL, "precision", "fp16"), "cpu_autocast", True))
    assert lines == [
        "cpu_autocast: needs precision 'bf16' or 'fp32' (CPU autocast has no fast fp16) (got True)"
    ]
    assert parse_spec(with_value(MINIMAL, "cpu_autocast", True)).cpu_autocast  # bf16, the default


def test_cross_field_limits_name_the_later_field() -> None:
    (line,) = errors_of(with_value(with_value(MINIMAL, "optim.epochs", 3), "optim.warmup_epochs", 3))
    assert line == "optim.warmup_epochs: must be less than epochs (3) (got 3)"
    (line,) = errors_of(
        with_value(with_value(MINIMAL, "resources.time_limit_min", 2), "resources.signal_lead_s", 120)
    )
    assert line == "resources.signal_lead_s: must be less than time_limit_min * 60 (120 s) (got 120)"
    assert parse_spec(with_value(MINIMAL, "resources", {"time_limit_min": 3, "signal_lead_s": 179}))


def test_demo_images_smaller_than_the_crop() -> None:
    spec = with_value(with_value(MINIMAL, "data.demo", {"image_size": 64}), "data.crop_size", 96)
    assert errors_of(spec) == [
        "data.demo.image_size: 64 px demo images are smaller than data.crop_size (96); the loader would "
        "skip every image"
    ]


# ------------------------------------------------------------------------------------------ backbones


@pytest.mark.parametrize(
    ("backbone", "too_small", "smallest"),
    [
        ("resnet18", 32, 33),
        ("resnet50", 32, 33),
        ("convnext_tiny", 63, 64),
        ("vgg16", 63, 64),
        ("alexnet", 94, 95),
    ],
)
def test_crop_too_small_for_the_backbone(backbone: str, too_small: int, smallest: int) -> None:
    """The last feature map must be at least 2x2: with 1x1, BatchNorm refuses a per-rank batch of 1."""
    base = with_value(MINIMAL, "model.backbone", backbone)
    (line,) = errors_of(with_value(base, "data.crop_size", too_small))
    assert line.startswith(f"data.crop_size: {too_small} px is too small for {backbone}")
    assert line.endswith(f"use at least {smallest}")
    parse_spec(with_value(base, "data.crop_size", smallest))


@pytest.mark.parametrize(
    ("name", "hint"),
    [("vit_b_16", "not a torchvision convolutional backbone"), ("resnet5", "did you mean 'resnet50'?"),
     ("googlenet", "not a torchvision"), ("os.system", "not a torchvision")],
)  # fmt: skip
def test_backbones_come_from_the_registry(name: str, hint: str) -> None:
    (line,) = errors_of(with_value(MINIMAL, "model.backbone", name))
    assert line.startswith("model.backbone: ") and hint in line, line


def test_backbone_table_is_in_sync_with_torchvision() -> None:
    """schemas/backbones.json lists every torchvision classification model, and the trainer's own
    builder still gives the recorded smallest crop (regenerate: python -m launch.tools.backbones --write)."""
    import torchvision

    from launch.tools.backbones import _measure
    from schemas import backbones

    table = json.loads(backbones.TABLE_PATH.read_text())
    assert table["torchvision"] == torchvision.__version__.split("+")[0]
    listed = set(table["backbones"]) | set(table["unsupported"])
    assert listed == set(torchvision.models.list_models(module=torchvision.models))
    assert {"resnet50", "convnext_tiny", "regnet_y_400mf"} <= set(backbones.backbone_names())
    assert {"vit_b_16", "googlenet"} <= set(backbones.unsupported_backbones())
    for name in ("resnet18", "convnext_tiny", "alexnet"):
        entry, _ = _measure(name)
        assert entry == table["backbones"][name], name


# ------------------------------------------------------------------------------------- implied values


def test_hang_timeout_accepts_30_s_and_up_and_defaults_by_where_the_data_lives() -> None:
    """The watchdog restarts a group whose rank made no progress for this long: below 30 s a slow
    step on a shared machine would pass for a hang; the default doubles for object-store data."""
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "resources.hang_timeout_s", 30))) == 30
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "resources.hang_timeout_s", 7200))) == 7200
    assert hang_timeout_s(parse_spec(MINIMAL)) == 300
    assert hang_timeout_s(parse_spec(with_value(MINIMAL, "data.root", "s3://bucket/images"))) == 600
    line = errors_of(with_value(MINIMAL, "resources.hang_timeout_s", 29))[0]
    assert line.startswith("resources.hang_timeout_s:") and "30" in line, line
