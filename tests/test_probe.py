"""Dense linear probe: data layout, mIoU arithmetic, determinism, a learnable signal, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.builders import build_model
from launch.tools import probe as probe_mod
from launch.tools.probe import main, miou, run
from pixpro.demo_data import generate_demo_dataset
from pixpro.model import build_backbone
from schemas import load_spec
from tests.support.trainer import TINY_BACKBONE, tiny_spec, write_spec

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe") / "demo"
    generate_demo_dataset(root, num_images=15, image_size=64, seed=2)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A PixPro ``state_dict`` saved as a .pt file, and its spec (no trainer run needed here)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    spec = write_spec(tmp / "spec.json", tiny_spec(tmp / "data"))
    model = build_model(load_spec(spec))
    path = tmp / "pixpro.pt"
    torch.save(model.state_dict(), path)
    return path, spec


def test_miou_counts_classes_present_in_the_ground_truth():
    conf = torch.tensor([[6, 2, 0], [1, 3, 0], [0, 1, 0]])  # rows = truth; class 2 predicted never, present
    score, ious = miou(conf)
    assert ious == {0: 6 / 9, 1: 3 / 7, 2: 0.0}
    assert score == pytest.approx((6 / 9 + 3 / 7) / 3)
    absent = torch.tensor([[5, 1, 0], [0, 4, 0], [0, 0, 0]])  # class 2 neither in truth nor predicted
    assert miou(absent)[1] == {0: 5 / 6, 1: 4 / 5}


def test_probe_is_deterministic_and_reports_json(demo, checkpoint, capsys):
    path, spec = checkpoint
    args = [str(path), "--spec", str(spec), "--data", str(demo), "--epochs", "3", "--seed", "5"]
    assert main([*args, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*args, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first == second
    assert first["train_images"] == 12 and first["test_images"] == 3  # last 20% by name held out
    assert first["backbone"] == TINY_BACKBONE and first["weights"] == "pixpro"
    assert first["feature_size"] == [3, 3]  # squeezenet1_1 at 64 px
    assert 0 <= first["miou"] <= 1 and first["miou"] == pytest.approx(
        np.mean(list(first["per_class_iou"].values()))
    )
    assert main(args) == 0
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and summary.startswith(f"mIoU {100 * first['miou']:.1f}%")


def test_random_init_baseline_is_seeded(demo, checkpoint):
    _, spec = checkpoint
    a = run(None, str(spec), demo, random_init=True, seed=1, epochs=2)
    b = run(None, None, demo, random_init=True, seed=1, epochs=2, backbone_name=TINY_BACKBONE)
    c = run(None, None, demo, random_init=True, seed=2, epochs=2, backbone_name=TINY_BACKBONE)
    assert a.weights == "random-init" and a.step is None
    assert a.miou == b.miou and a.per_class_iou == b.per_class_iou
    assert c.per_class_iou != a.per_class_iou


def _halves_dataset(root: Path, n: int = 10, size: int = 64) -> None:
    """Red on one half, blue on the other; the red half is class 1. A dense probe must find it."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image = np.zeros((size, size, 3), np.uint8)
        mask = np.zeros((size, size), np.uint8)
        red = slice(0, size // 2) if i % 2 else slice(size // 2, size)
        image[..., 2] = 200
        image[:, red] = (200, 0, 0)
        mask[:, red] = 1
        image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")


def test_probe_finds_a_simple_dense_signal_and_extracts_features_once(tmp_path, monkeypatch):
    _halves_dataset(tmp_path / "halves")
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", zero_init_residual=False)
    calls = []
    backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    result = probe_mod.probe(backbone, tmp_path / "halves", seed=0, epochs=20)
    assert sum(calls) == 10  # every image through the backbone exactly once
    assert result["classes"] == ["class0", "class1"]  # no classes.json: named by id
    assert result["miou"] > 0.8, result


def _one_clear_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("pixpro eval: error:"), err


def test_wrong_data_folders_and_missing_checkpoints(tmp_path, demo, checkpoint, capsys):
    path, spec = checkpoint
    (tmp_path / "no-masks" / "images").mkdir(parents=True)
    assert main([str(path), "--spec", str(spec), "--data", str(tmp_path / "no-masks")]) == 2
    err = capsys.readouterr().err
    assert "masks" in err
    _one_clear_line(err)

    unmatched = tmp_path / "unmatched"
    (unmatched / "images").mkdir(parents=True)
    (unmatched / "masks").mkdir()
    Image.new("RGB", (40, 40)).save(unmatched / "images" / "a.png")
    Image.new("L", (40, 40)).save(unmatched / "masks" / "b.png")
    assert main([str(path), "--spec", str(spec), "--data", str(unmatched)]) == 2
    err = capsys.readouterr().err
    assert "0 image/mask pairs" in err
    _one_clear_line(err)

    assert main([str(tmp_path / "missing.pt"), "--spec", str(spec), "--data", str(demo)]) == 3
    _one_clear_line(capsys.readouterr().err)
    assert main(["--random-init", "--data", str(demo)]) == 2
    _one_clear_line(capsys.readouterr().err)
