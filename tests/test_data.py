"""ImageFolder discovery/decoding/skipping, per-sample seeds, and worker-independent TwoViewDataset."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from pixpro import sources
from pixpro.data import (
    MAX_READ_FAILURES,
    DatasetError,
    DataUnavailable,
    ImageFolder,
    TwoViewDataset,
    sample_generator,
    sample_seed,
)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _random_image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Class subfolders plus flat files, mixed case suffixes, and files that are not images."""
    _save(tmp_path / "b" / "2.png", _random_image(0))
    _save(tmp_path / "b" / "1.PNG", _random_image(1))
    _save(tmp_path / "a" / "x.jpg", _random_image(2))
    _save(tmp_path / "a" / "deep" / "y.jpeg", _random_image(3))
    _save(tmp_path / "top.png", _random_image(4, 40, 20))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "cache.npy").write_bytes(b"\x00" * 10)
    return tmp_path


def test_finds_images_recursively_in_relative_path_order(folder: Path) -> None:
    images = ImageFolder(folder)
    relative = [p.relative_to(folder).as_posix() for p in images.paths]
    assert relative == ["a/deep/y.jpeg", "a/x.jpg", "b/1.PNG", "b/2.png", "top.png"]
    assert len(images) == 5


def test_symlinked_folders_are_followed_without_looping(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    _save(outside / "z.png", _random_image(9))
    (folder / "c").symlink_to(outside, target_is_directory=True)
    (folder / "a" / "loop").symlink_to(folder, target_is_directory=True)
    relative = [p.relative_to(folder).as_posix() for p in ImageFolder(folder).paths]
    assert relative == ["a/deep/y.jpeg", "a/x.jpg", "b/1.PNG", "b/2.png", "c/z.png", "top.png"]


def test_load_returns_exact_uint8_rgb_chw(folder: Path) -> None:
    images = ImageFolder(str(folder))
    image = images.load(4)
    assert image.dtype == torch.uint8
    assert image.shape == (3, 40, 20)
    assert torch.equal(image, torch.from_numpy(_random_image(4, 40, 20)).permute(2, 0, 1))
    assert images.load(-1).shape == (3, 40, 20)
    assert images.load(1).shape == (3, 24, 32)  # JPEG decodes too


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    _save(tmp_path / "g.png", gray)
    _save(tmp_path / "r.png", np.dstack([_random_image(5, 12, 10), np.full((12, 10), 7, np.uint8)]))
    images = ImageFolder(tmp_path)
    assert torch.equal(images.load(0), torch.from_numpy(gray).expand(3, 12, 10))
    assert images.load(1).shape == (3, 12, 10)


def test_missing_empty_and_file_roots_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        ImageFolder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="no JPEG or PNG"):
        ImageFolder(tmp_path / "empty")
    assert issubclass(DatasetError, ValueError)


def test_corrupt_file_is_skipped_with_one_warning(folder: Path) -> None:
    bad = folder / "b" / "1.PNG"
    bad.write_bytes(b"definitely not a png")
    images = ImageFolder(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replaced = images.load(2)
        again = images.load(2)
        assert images.load_indexed(2)[0] == 3
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(bad) in message and "Unsupported image file" in message and ".cpp" not in message
    assert torch.equal(replaced, images.load(3))
    assert torch.equal(again, replaced)


def test_truncated_last_file_wraps_to_first(folder: Path) -> None:
    last = folder / "top.png"
    last.write_bytes(last.read_bytes()[:60])
    images = ImageFolder(folder)
    with pytest.warns(UserWarning, match="top.png"):
        assert torch.equal(images.load(4), images.load(0))


def test_all_unreadable_raises(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    images = ImageFolder(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="none of the 2 images"):
        images.load(0)


def test_min_size_skips_small_images(folder: Path) -> None:
    images = ImageFolder(folder, min_size=24)  # top.png is 20 wide
    with pytest.warns(UserWarning, match=r"top\.png: 20x40 is smaller than min_size 24"):
        assert torch.equal(images.load(4), images.load(0))


def _packed(tmp_path: Path, n: int = 24) -> Path:
    from launch.tools.pack import main as pack_main

    for i in range(n):
        _save(tmp_path / "src" / f"c{i % 3}" / f"{i:03d}.png", _random_image(i))
    assert pack_main([str(tmp_path / "src"), str(tmp_path / "packed"), "--shard-size", "8KB"]) == 0
    return tmp_path / "packed"


def _outage(packed: Path, monkeypatch: pytest.MonkeyPatch, ends_after_sleeps: int | None) -> None:
    """The shards vanish (ENOENT, as on a Lustre client during an eviction) and come back after the
    retry loop has slept ``ends_after_sleeps`` times (never: None); the sleeps themselves take no time."""
    hidden = packed.parent / "hidden"
    hidden.mkdir(exist_ok=True)
    for shard in packed.glob("shard-*.tar"):
        shard.rename(hidden / shard.name)
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == ends_after_sleeps:
            for shard in hidden.iterdir():
                shard.rename(packed / shard.name)

    monkeypatch.setattr(sources.time, "sleep", sleep)


def test_a_storage_outage_of_seconds_is_retried_through(tmp_path: Path, monkeypatch) -> None:
    packed = _packed(tmp_path)
    images = ImageFolder(packed)
    expected = images.load(7)
    fresh = ImageFolder(packed)  # a worker that opens its shards during the outage
    _outage(packed, monkeypatch, ends_after_sleeps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.load_indexed(7)[0] == 7 and torch.equal(fresh.load(7), expected)
    assert fresh.skipped == 0


def test_a_long_outage_is_a_storage_failure_and_blacklists_nothing(tmp_path: Path, monkeypatch) -> None:
    packed = _packed(tmp_path)
    images = ImageFolder(packed)
    _outage(packed, monkeypatch, ends_after_sleeps=None)
    with (
        pytest.warns(UserWarning, match="read failed") as caught,
        pytest.raises(DataUnavailable, match=f"{MAX_READ_FAILURES} reads in a row failed"),
    ):
        images.load(7)
    assert len(caught) == MAX_READ_FAILURES and not issubclass(DataUnavailable, DatasetError)
    for shard in (tmp_path / "hidden").iterdir():  # the outage ends: the same process reads every image
        shard.rename(packed / shard.name)
    assert [images.load_indexed(i)[0] for i in range(len(images))] == list(range(len(images)))


def test_a_missing_file_of_a_folder_is_replaced_but_tried_again_later(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources.time, "sleep", lambda seconds: None)
    images = ImageFolder(folder)
    (folder / "a" / "x.jpg").rename(folder / "x.jpg.away")
    with pytest.warns(UserWarning, match="x.jpg: read failed"):
        assert images.load_indexed(1)[0] == 2
    (folder / "x.jpg.away").rename(folder / "a" / "x.jpg")
    assert images.load_indexed(1)[0] == 1


def test_sample_seed_is_deterministic_63_bit_and_distinct() -> None:
    seeds = {sample_seed(7, epoch, index) for epoch in range(4) for index in range(50)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(7, 1, 2) == sample_seed(7, 1, 2)
    assert sample_seed(7, 1, 2) != sample_seed(8, 1, 2)
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1)
    a = torch.rand(5, generator=sample_generator(3, 2, 1))
    assert torch.equal(a, torch.rand(5, generator=sample_generator(3, 2, 1)))
    with pytest.raises(ValueError):
        sample_seed(0, -1, 0)


class _Views(NamedTuple):
    view1: torch.Tensor
    view2: torch.Tensor
    coords1: torch.Tensor
    coords2: torch.Tensor


def _stand_in_transform(image: torch.Tensor, generator: torch.Generator) -> _Views:
    """Random 16x16 crops plus noise, all drawn from ``generator``, like the real transform."""

    def view() -> tuple[torch.Tensor, torch.Tensor]:
        top = int(torch.randint(0, image.shape[1] - 15, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[2] - 15, (1,), generator=generator))
        crop = image[:, top : top + 16, left : left + 16].float() / 255
        noise = torch.rand(crop.shape, generator=generator) * 0.1
        return crop + noise, torch.tensor([left, top, left + 15, top + 15], dtype=torch.float32)

    (v1, c1), (v2, c2) = view(), view()
    return _Views(v1, v2, c1, c2)


class _EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for a fixed schedule, as the trainer's sampler does."""

    def __init__(self, keys: list[tuple[int, int]]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def test_dataset_sample_is_function_of_epoch_and_index(folder: Path) -> None:
    dataset = TwoViewDataset(ImageFolder(folder), _stand_in_transform, seed=11)
    assert len(dataset) == 5
    sample = dataset[(2, 3)]
    assert set(sample) == {"view1", "view2", "coords1", "coords2", "index", "skipped"}
    assert sample["skipped"] == 0
    assert sample["index"] == 3
    repeat = dataset[(2, 3)]
    assert all(torch.equal(sample[k], repeat[k]) for k in ("view1", "view2", "coords1", "coords2"))
    other_epoch = dataset[(3, 3)]
    assert not torch.equal(sample["view1"], other_epoch["view1"])
    other_seed = TwoViewDataset(ImageFolder(folder), _stand_in_transform, seed=12)[(2, 3)]
    assert not torch.equal(sample["view1"], other_seed["view1"])
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        dataset[3]


def test_worker_count_does_not_change_batches(folder: Path) -> None:
    dataset = TwoViewDataset(ImageFolder(folder), _stand_in_transform, seed=5)
    keys = [(epoch, index) for epoch in (0, 1) for index in (4, 0, 2, 1, 3, 2)]

    def batches(workers: int) -> list[dict[str, torch.Tensor]]:
        loader = DataLoader(dataset, batch_size=4, sampler=_EpochSampler(keys), num_workers=workers)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert serial[0]["view1"].shape == (4, 3, 16, 16)
    assert serial[0]["index"].tolist() == [4, 0, 2, 1]


def test_with_real_two_view_transform(folder: Path) -> None:
    from pixpro.augment import TwoViewTransform

    dataset = TwoViewDataset(ImageFolder(folder, min_size=16), TwoViewTransform(crop_size=16), seed=0)
    a, b = dataset[(0, 1)], dataset[(0, 1)]
    assert a["view1"].shape == a["view2"].shape == (3, 16, 16)
    assert a["coords1"].shape == (4,)
    assert all(torch.equal(a[k], b[k]) for k in ("view1", "view2", "coords1", "coords2"))
