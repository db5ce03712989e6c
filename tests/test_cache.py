"""``data.cache``: the disk cache is keyed by the dataset, verifies hits, and never fails a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from launch.tools.pack import main as pack_main
from pixpro.sources import CachedSource, FolderSource, PackedSource


def _images(root: Path, seed: int, n: int = 4) -> Path:
    """``n`` PNGs with the same names for every seed, different pixels."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


def test_runs_on_other_data_sharing_a_cache_folder_read_their_own_images(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    a = CachedSource(FolderSource(_images(tmp_path / "a", 1)), "disk", 10**9, cache)
    b = CachedSource(FolderSource(_images(tmp_path / "b", 2)), "disk", 10**9, cache)
    first = [a.read(i) for i in range(4)]
    assert [b.read(i) for i in range(4)] == [b.source.read(i) for i in range(4)] != first
    assert a.folder is not None and b.folder is not None
    assert b.hits == 0 and a.folder != b.folder and a.folder.parent == b.folder.parent
    again = CachedSource(FolderSource(tmp_path / "a"), "disk", 10**9, cache)  # another rank, same data
    assert [again.read(i) for i in range(4)] == first and again.hits == 4
    assert (a.folder / ".budget").exists() and (b.folder / ".budget").exists()


def test_a_pack_is_keyed_by_its_digests_and_a_hit_of_the_wrong_length_is_read_again(tmp_path: Path) -> None:
    src = _images(tmp_path / "src", 3)
    assert pack_main([str(src), str(tmp_path / "packed"), "--workers", "1"]) == 0
    packed = PackedSource(tmp_path / "packed")
    cache = CachedSource(packed, "disk", 10**9, str(tmp_path / "cache"))
    truth = [cache.read(i) for i in range(4)]
    cache._file(2).write_bytes(b"stale bytes of another length")
    assert [cache.read(i) for i in range(4)] == truth and cache.hits == 3
    folder = CachedSource(FolderSource(src), "disk", 10**9, str(tmp_path / "cache"))
    assert folder.folder != cache.folder  # a pack and its source folder are different datasets here
