"""Synthetic demo scenes: determinism, mask/image alignment, idempotence and refusal, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixpro import demo_data
from pixpro.data import DatasetError, ImageFolder
from pixpro.demo_data import CLASS_NAMES, DemoInfo, generate_demo_dataset, main

NUM, SIZE = 24, 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoInfo:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", NUM, SIZE, seed=3)


def _arrays(info: DemoInfo) -> tuple[np.ndarray, np.ndarray]:
    names = sorted(p.name for p in info.images_dir.iterdir())
    images = np.stack([np.asarray(Image.open(info.images_dir / n)) for n in names])
    masks = np.stack([np.asarray(Image.open(info.masks_dir / n)) for n in names])
    return images, masks


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_metadata(demo: DemoInfo) -> None:
    assert demo.created and demo.num_classes == len(CLASS_NAMES) >= 5
    names = [f"{i:05d}.png" for i in range(NUM)]
    assert sorted(p.name for p in demo.images_dir.iterdir()) == names
    assert sorted(p.name for p in demo.masks_dir.iterdir()) == names
    meta = json.loads((demo.root / "classes.json").read_text())
    assert meta["classes"][0] == "background" and meta["classes"] == list(demo.class_names)
    assert (meta["num_images"], meta["image_size"], meta["seed"]) == (NUM, SIZE, 3)
    assert demo.mask_path(demo.images_dir / "00007.png") == demo.masks_dir / "00007.png"
    assert not [p for p in demo.root.parent.iterdir() if p.name != "data"]  # no staging leftovers


def test_same_seed_same_bytes_and_prefix_stable(demo: DemoInfo, tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", NUM, SIZE, seed=3)
    assert _file_bytes(again.root) == _file_bytes(demo.root)
    fewer = generate_demo_dataset(tmp_path / "fewer", 4, SIZE, seed=3)
    assert all(
        (fewer.images_dir / n).read_bytes() == (demo.images_dir / n).read_bytes()
        for n in ("00000.png", "00003.png")
    )
    other = generate_demo_dataset(tmp_path / "other", 4, SIZE, seed=4)
    assert (other.images_dir / "00000.png").read_bytes() != (demo.images_dir / "00000.png").read_bytes()


def test_masks_align_with_images(demo: DemoInfo) -> None:
    images, masks = _arrays(demo)
    assert images.shape == (NUM, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert masks.shape == (NUM, SIZE, SIZE) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) == set(range(demo.num_classes))  # every class, nothing else
    pixels = images.astype(np.float64)

    def edge_strength(labels: np.ndarray) -> float:
        """Mean colour jump between horizontal neighbours whose labels differ."""
        jump = np.abs(np.diff(pixels, axis=2)).sum(-1)
        return float(jump[labels[:, :, 1:] != labels[:, :, :-1]].mean())

    # Mask edges are image edges: far sharper there than at the same edges shifted by a few pixels.
    assert edge_strength(masks) > 2 * edge_strength(np.roll(masks, 5, axis=2))


def test_colour_does_not_code_the_class() -> None:
    """Object colours are drawn per object: every class spans the colour cube, with the same mean."""
    rng = np.random.default_rng(0)
    colours = np.stack([demo_data._object_colours(rng) for _ in range(2000)])
    assert np.all(np.linalg.norm(colours[:, 0] - colours[:, 1], axis=1) >= demo_data._MIN_CONTRAST - 1e-3)
    assert np.abs(colours.reshape(-1, 3).mean(0) - 127.5).max() < 10


def test_rendered_class_colours_vary_across_images(demo: DemoInfo) -> None:
    images, masks = _arrays(demo)
    for cls in range(1, demo.num_classes):
        means = [images[i][masks[i] == cls].mean(0) for i in range(NUM) if (masks[i] == cls).sum() > 20]
        assert len(means) >= 3 and np.std(means, axis=0).max() > 35, CLASS_NAMES[cls]


def test_image_folder_finds_all_images(demo: DemoInfo) -> None:
    images = ImageFolder(demo.images_dir, min_size=SIZE)
    assert len(images) == NUM
    assert images.load(NUM - 1).shape == (3, SIZE, SIZE)


def test_idempotent_without_rewriting(demo: DemoInfo) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")}
    again = generate_demo_dataset(demo.root, NUM, SIZE, seed=3)
    assert not again.created and again.root == demo.root
    assert {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")} == before


def test_refuses_foreign_or_mismatched_folders(demo: DemoInfo, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not empty"):
        generate_demo_dataset(tmp_path / "busy", 2, 32)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["thesis.tex"]
    with pytest.raises(DatasetError, match=r"different demo dataset.*seed=3"):
        generate_demo_dataset(demo.root, NUM, SIZE, seed=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        generate_demo_dataset(tmp_path / "file", 2, 32)
    with pytest.raises(DatasetError, match="num_images"):
        generate_demo_dataset(tmp_path / "bad", 0, 32)


def test_incomplete_dataset_is_refused_and_empty_folder_is_used(tmp_path: Path) -> None:
    info = generate_demo_dataset(tmp_path / "part", 3, 32)
    (info.masks_dir / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"incomplete.*masks"):
        generate_demo_dataset(info.root, 3, 32)
    (tmp_path / "empty").mkdir()
    assert generate_demo_dataset(tmp_path / "empty", 2, 32).created


def test_corrupt_png_is_skipped_with_warning(demo: DemoInfo, tmp_path: Path) -> None:
    for name in ("00000.png", "00001.png", "00002.png"):
        (tmp_path / name).write_bytes((demo.images_dir / name).read_bytes())
    (tmp_path / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    images = ImageFolder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = [images.load(i) for i in range(3)]
    assert len(caught) == 1 and "00001.png" in str(caught[0].message)
    assert (loaded[1] == loaded[2]).all()


def test_empty_and_missing_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no JPEG or PNG"):
        ImageFolder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--num-images", "2", "--size", "32", "--seed", "1"]) == 0
    assert "wrote 2 images of 32px" in capsys.readouterr().out
    assert len(ImageFolder(tmp_path / "cli" / "images")) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "cli"), "--num-images", "3"])
    assert exit_info.value.code == 2
    assert "different demo dataset" in capsys.readouterr().err


def test_concurrent_generator_that_finishes_first_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shared"
    real_write = demo_data._write

    def write_while_another_task_finishes(folder: Path, params: dict[str, object]) -> None:
        real_write(folder, params)
        monkeypatch.setattr(demo_data, "_write", real_write)
        generate_demo_dataset(root, 2, 32)  # the other task publishes first

    monkeypatch.setattr(demo_data, "_write", write_while_another_task_finishes)
    info = generate_demo_dataset(root, 2, 32)
    assert not info.created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # staging folders cleaned up
    assert len(ImageFolder(info.images_dir)) == 2


def test_object_colours_fall_back_to_the_far_corner() -> None:
    """When no candidate is far enough, the second colour is the cube corner farthest from the first."""

    class Grey:
        def uniform(self, low: float, high: float, size: int | tuple[int, ...]) -> np.ndarray:
            return np.full(size, 120.0)

    colours = demo_data._object_colours(Grey())  # type: ignore[arg-type]
    assert colours.dtype == np.float32
    assert colours[1].tolist() == [255.0, 255.0, 255.0]
    assert np.linalg.norm(colours[0] - colours[1]) >= demo_data._MIN_CONTRAST
