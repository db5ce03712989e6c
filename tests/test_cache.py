"""``data.cache``: the disk cache is keyed by the dataset, verifies hits, and never fails a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
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


_FULL_DISK = """
import json, sys, warnings
from pixpro.data import ImageFolder
from pixpro.sources import CachedSource
folder = ImageFolder(sys.argv[1], min_size=16)
folder.source = CachedSource(folder.source, "disk", 10**9, sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = [folder.load_indexed(i)[0] for i in range(4)]
print(json.dumps({"loaded": loaded, "skipped": folder.skipped, "warnings": [str(w.message) for w in caught]}))
"""


def test_a_full_cache_disk_warns_once_and_the_run_reads_on_uncached(tmp_path: Path) -> None:
    """Writes beyond 1000 bytes fail with EFBIG (RLIMIT_FSIZE), as on a full disk: every image still
    loads, none is skipped, one warning."""
    import json
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))

    images = _images(tmp_path / "a", 1)
    run = [sys.executable, "-c", _FULL_DISK, str(images), str(tmp_path / "cache")]
    res = subprocess.run(run, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["loaded"] == [0, 1, 2, 3] and out["skipped"] == 0
    assert len(out["warnings"]) == 1 and "caching stops" in out["warnings"][0], out["warnings"]


class _Blobs:
    """A source of ``n`` samples of 1000 bytes each (the sample's index in every byte, mod 256)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return str(index)

    def label(self, index: int) -> int:
        return -1

    def usable(self, index: int) -> bool:
        return True

    def read(self, index: int) -> bytes:
        return bytes([index % 256]) * 1000


def _fill(folder: str, bound: int) -> None:
    cache = CachedSource(_Blobs(40), "disk", bound, folder)
    assert all(cache.read(i) == bytes([i]) * 1000 for i in range(40))


def test_the_node_wide_lock_covers_the_budget_counter_only(tmp_path: Path, monkeypatch) -> None:
    """A sample is written and renamed outside the lock; the counter is one fixed-width number."""
    import fcntl
    import os

    locked: list[bool] = [False]
    renamed_under_lock: list[bool] = []
    lockf, replace = fcntl.lockf, os.replace

    def recording_lockf(fd: Any, op: int, *args: Any) -> Any:
        locked[0] = op != fcntl.LOCK_UN
        return lockf(fd, op, *args)

    def recording_replace(src: Any, dst: Any) -> None:
        renamed_under_lock.append(locked[0])
        replace(src, dst)

    monkeypatch.setattr(fcntl, "lockf", recording_lockf)
    monkeypatch.setattr(os, "replace", recording_replace)
    _fill(str(tmp_path / "cache"), 10**9)
    assert renamed_under_lock == [False] * 40
    (budget,) = (tmp_path / "cache").glob("*/.budget")
    assert budget.read_bytes() == b"40000".rjust(20)


def test_processes_filling_one_cache_at_once_keep_its_bound(tmp_path: Path) -> None:
    import multiprocessing

    bound = 25_500
    fork = multiprocessing.get_context("fork")
    fillers = [fork.Process(target=_fill, args=(str(tmp_path), bound)) for _ in range(4)]
    for p in fillers:
        p.start()
    for p in fillers:
        p.join(timeout=120)
    assert [p.exitcode for p in fillers] == [0] * 4
    (budget,) = tmp_path.glob("*/.budget")
    held = sum(f.stat().st_size for f in budget.parent.rglob("*.bin"))
    assert 0 < held <= int(budget.read_bytes()) <= bound  # a sample two processes cached counts twice


def test_a_memory_cache_in_every_loader_process_is_reported_with_its_node_total() -> None:
    from launch.builders import memory_cache_warning

    note = memory_cache_warning(8.0, 8, 8, 8, 256 * 10**9)  # the review's node: 8 ranks x 8 workers
    assert note is not None and "512 GB on this node, more than its 256 GB" in note and "1 in 64" in note
    assert memory_cache_warning(8.0, 0, 1, 1, 10**12) is None  # one process reads every sample


def test_a_cached_sample_that_cannot_be_read_is_read_from_the_source(tmp_path: Path) -> None:
    cache = CachedSource(_Blobs(3), "disk", 10**9, str(tmp_path))
    cache._file(1).parent.mkdir(parents=True)
    cache._file(1).mkdir()  # reading it fails (EISDIR), as a failing cache disk's EIO would
    with pytest.warns(UserWarning, match="caching stops"):  # nor can it be written there
        assert cache.read(1) == bytes([1]) * 1000 and cache.misses == 1
