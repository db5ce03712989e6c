"""Linear and kNN classification on a frozen encoder: labels, splits, arithmetic, a learnable signal,
folder and pack alike, the CLI's --task and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.builders import build_model
from launch.tools import pack
from launch.tools.classify import knn_scores, main, run, topk_accuracy
from launch.tools.labelled import dominant_class, load_labelled
from pixpro.demo_data import generate_demo_dataset
from schemas import load_spec
from tests.support import zygote
from tests.support.cli import cli, run_cli
from tests.support.trainer import TINY_BACKBONE, tiny_spec, write_spec

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def colour_classes(root: Path, per_class: int = 6) -> Path:
    """Class sub-folders whose class is the image's colour (with noise): any encoder can separate them."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (48, 56, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def test_the_dominant_class_ignores_background_and_void() -> None:
    mask = np.array([[0, 0, 0, 3], [2, 3, 255, 255], [255, 255, 0, 2]], dtype=np.uint8)
    assert dominant_class(mask) in (2, 3) and dominant_class(np.where(mask == 2, 0, mask)) == 3
    assert dominant_class(np.zeros((4, 4), np.uint8)) is None
    assert dominant_class(np.full((4, 4), 255, np.uint8)) is None


def test_knn_votes_are_similarity_weighted() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.0, 2.0]])  # closest to the class-1 image; norms do not matter
    scores = knn_scores(train, labels, test, num_classes=2, k=2, t=0.5)
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.tensor([0.0, 1.0])
    assert scores[0, 1] == pytest.approx(float((sims[2] / 0.5).exp()))  # k=2: the class-1 image ...
    assert scores[0, 0] == pytest.approx(float((sims[1] / 0.5).exp()))  # ... and the nearer class-0 one
    assert scores.argmax(1).tolist() == [1]


def test_topk_accuracy_counts_top1_and_top5() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 2])) == (pytest.approx(2 / 3), 1.0)  # 3 classes


def test_class_folders_are_split_per_class(tmp_path: Path) -> None:
    data = load_labelled(colour_classes(tmp_path / "colours", per_class=10))
    assert data.classes == ["blue", "green", "red"] and data.layout == "class folders"
    assert np.bincount(data.test.labels).tolist() == [2, 2, 2]  # every fifth of each class
    assert np.bincount(data.train.labels).tolist() == [8, 8, 8]
    assert not set(data.train.indices) & set(data.test.indices)
    names = [data.test.images.source.name(int(i)) for i in data.test.indices]
    assert names[:2] == ["blue/004.png", "blue/009.png"]


def test_demo_scenes_are_labelled_by_their_dominant_object(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    generate_demo_dataset(root, num_images=20, image_size=48, seed=3)
    data = load_labelled(root)
    assert data.layout == "demo scenes" and data.classes == ["disc", "square", "triangle", "ring", "star"]
    for split in (data.train, data.test):
        for i, label in zip(split.indices, split.labels, strict=True):
            name = Path(split.images.source.name(int(i))).name
            mask = np.asarray(Image.open(root / "masks" / name))
            assert label + 1 == np.bincount(mask[(mask != 0) & (mask != 255)]).argmax()
    assert len(data.train) + len(data.test) + data.left_out == 20


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear", "knn"])
def test_a_colour_signal_is_found_in_a_folder_and_its_pack_alike(tmp_path: Path, task: str, capsys) -> None:
    colours = colour_classes(tmp_path / "colours")
    assert pack.main([str(colours), str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    args = ["--random-init", "--backbone", "resnet18", "--task", task, "--epochs", "20", "--json"]
    results = []
    for data in (colours, tmp_path / "packed"):
        assert main([*args, "--data", str(data)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    folder, packed = results
    assert folder["top1"] == 1.0 and folder["top5"] == 1.0, folder  # colour is trivially separable
    assert (folder["train_images"], folder["test_images"], folder["classes"]) == (15, 3, list(COLOURS))
    assert packed == folder  # same labels, same split, same crops


@pytest.mark.slow
def test_train_and_val_folders_are_used_as_given(tmp_path: Path) -> None:
    colour_classes(tmp_path / "tv" / "train", per_class=4)
    colour_classes(tmp_path / "tv" / "val", per_class=2)
    result = run(None, None, str(tmp_path / "tv"), "knn", random_init=True, backbone_name="resnet18")
    assert (result.layout, result.train_images, result.test_images, result.top1) == (
        "train/val folders",
        12,
        6,
        1.0,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A PixPro ``state_dict`` saved as a .pt file, and its spec (no trainer run needed here)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    spec = write_spec(tmp / "spec.json", tiny_spec(tmp / "data"))
    path = tmp / "pixpro.pt"
    torch.save(build_model(load_spec(spec)).state_dict(), path)
    return path, spec


@pytest.mark.slow
def test_pixpro_weights_through_the_cli_are_deterministic_and_seeded(tmp_path: Path, checkpoint) -> None:
    path, spec = checkpoint
    root = tmp_path / "demo"
    generate_demo_dataset(root, num_images=30, image_size=64, seed=1)
    home = tmp_path / "home"
    args = ["eval", str(path), "--spec", str(spec), "--data", str(root), "--task", "linear", "--json"]
    first_run = cli(*args, "--seed", "0", home=home, timeout=300)
    assert first_run.returncode == 0, first_run.stderr[-2000:]

    def tool(*options: str) -> subprocess.CompletedProcess[str]:
        """The tool the CLI runs, with the arguments it passes (forked: no second 7 s of imports); the
        first comparison below proves the arguments are the CLI's."""
        cmd = [sys.executable, "-m", "launch.tools.classify", str(path), "--data", str(root), *options]
        done = zygote.run([*cmd, "--spec", str(spec)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    first = json.loads(first_run.stdout)
    again, other = (json.loads(tool("--seed", s, "--json", "--task", "linear").stdout) for s in "01")
    assert first == again and first["weights"] == "pixpro" and first["task"] == "linear"
    assert first["settings"]["lr"] == 30.0 and first["settings"]["momentum"] == 0.9
    assert 0 <= first["top1"] <= first["top5"] <= 1 and other["seed"] == 1
    table = tool("--seed", "0", "--task", "knn")
    assert table.stdout.splitlines()[0].startswith("| task | weights |"), table.stderr
    assert f"| knn | {TINY_BACKBONE} pixpro |" in table.stdout


def test_bad_tasks_and_data_are_one_line_exit_2(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    bad = cli("eval", "x.pt", "--data", str(tmp_path), "--task", "segment", home=home)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "pixpro: --task segment: must be one of dense, linear, knn"
    ), bad.stderr
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "a.png")
    proc = cli("eval", "--random-init", "x", "--data", str(tmp_path / "flat"), "--task", "knn", home=home)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no class sub-folders" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # a local folder that is not there: the CLI says so itself, before starting the tool (seconds of torch)
    monkeypatch.setenv("PIXPRO_HOME", str(home))
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail(f"the tool was started: {a}"))
    code, _, err = run_cli("eval", "--random-init", "x", "--data", str(tmp_path / "nope"), "--task", "knn")
    assert code == 2 and err == f"pixpro: --data: data folder {tmp_path / 'nope'} does not exist\n", err
