"""``pixpro pack``: tar shards + a flat index that the trainer reads by range, bitwise like the folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.preempt import children_of
from launch.tools.pack import main as pack_main
from launch.tools.pack import parse_size
from pixpro.augment import TwoViewTransform
from pixpro.data import ImageFolder, TwoViewDataset
from pixpro.sources import CachedSource, FolderSource, PackedSource, open_source
from tests.support.procs import alive, wait_for
from tests.support.trainer import REPO, trainer_env


def _images(root: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = f"n{i % 3:02d}"
        path = root / cls / f"img{i:03d}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(path)
    (root / "n01" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_pack_indexes_every_file_and_reads_back_the_same_bytes(tmp_path: Path, capsys) -> None:
    src = _images(tmp_path / "src")
    assert pack_main([str(src), str(tmp_path / "packed"), "--shard-size", "20KB", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 undecodable image(s)" in err  # reported, never dropped silently
    folder, packed = FolderSource(src), open_source(tmp_path / "packed")
    assert isinstance(packed, PackedSource) and len(packed) == len(folder) == 31
    assert len(packed.shards) > 3
    for i in range(len(folder)):
        assert packed.name(i) == folder.name(i) and packed.label(i) == folder.label(i)
        if folder.name(i).endswith("broken.jpg"):
            assert not packed.usable(i)
        else:
            assert packed.read(i) == folder.read(i)
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert (
        manifest["samples"] == 31
        and manifest["usable"] == 30
        and manifest["classes"] == ["n00", "n01", "n02"]
    )
    assert [u["path"] for u in manifest["undecodable"]] == ["n01/broken.jpg"]
    with tarfile.open(tmp_path / "packed" / "shard-000000.tar") as tar:  # standard tools read it
        names = tar.getnames()
    assert names[:2] == ["000000000.png", "000000000.cls"]


def test_packed_training_samples_equal_the_folder_s(tmp_path: Path) -> None:
    src = _images(tmp_path / "src")
    assert pack_main([str(src), str(tmp_path / "packed"), "--workers", "1"]) == 0
    transform = TwoViewTransform(crop_size=32, scale=(0.3, 1.0))
    a = TwoViewDataset(ImageFolder(src, min_size=32), transform, seed=5)
    b = TwoViewDataset(ImageFolder(tmp_path / "packed", min_size=32), transform, seed=5)
    with pytest.warns(UserWarning, match="broken.jpg"):
        for key in [(0, i) for i in range(len(a))] + [(1, 7)]:
            x, y = a[key], b[key]
            assert all(torch.equal(x[k], y[k]) for k in ("view1", "view2", "coords1", "coords2")), key
            assert x["skipped"] == y["skipped"]


def test_killed_pack_continues_and_a_finished_one_is_verified(tmp_path: Path) -> None:
    src = _images(tmp_path / "src", n=60)
    dest = tmp_path / "packed"
    cmd = [
        sys.executable,
        "-m",
        "launch.tools.pack",
        str(src),
        str(dest),
        "--shard-size",
        "8KB",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(dest.glob("shard-*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    workers = children_of(proc.pid)
    assert workers  # its process pool
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dest / "manifest.json").exists()
    # the killed pack's workers die with it instead of living on as orphans
    wait_for("the pack's workers to die with it", lambda: not any(map(alive, workers)), 60, 0.05)
    done = {p.name: p.stat().st_mtime_ns for p in dest.glob("shard-*.tar")}
    res = subprocess.run(
        [*cmd, "--json"], cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["action"] == "packed" and summary["shards_reused"] >= 3
    kept = [n for n, t in done.items() if (dest / n).stat().st_mtime_ns == t]
    assert len(kept) >= 3  # finished shards were not rewritten
    again = subprocess.run(
        [*cmd, "--json"], cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and json.loads(again.stdout)["action"] == "verified"
    for i in range(len(FolderSource(src))):
        if PackedSource(dest).usable(i):
            assert PackedSource(dest).read(i) == FolderSource(src).read(i)


def test_bad_input_is_one_line_and_nothing_is_lost(tmp_path: Path, capsys) -> None:
    src = _images(tmp_path / "src", n=6)
    assert pack_main([str(src), str(tmp_path / "packed"), "--shard-size", "8KB"]) == 0
    manifest = (tmp_path / "packed" / "manifest.json").read_bytes()
    other = _images(tmp_path / "other", n=4)
    capsys.readouterr()
    assert pack_main([str(other), str(tmp_path / "packed"), "--shard-size", "8KB"]) == 2  # another pack
    assert "already holds a different pack" in capsys.readouterr().err
    assert (tmp_path / "packed" / "manifest.json").read_bytes() == manifest
    before = sorted(src.rglob("*"))  # shards among the images they pack: refused, nothing written
    for inside in (src, src / "n01" / "packed", src / ".." / "src"):
        assert pack_main([str(src), str(inside)]) == 2
        assert "within the dataset folder" in capsys.readouterr().err
    assert sorted(src.rglob("*")) == before
    assert pack_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    webdataset = tmp_path / "wds"  # names a pack would write, not written by one: never overwritten
    webdataset.mkdir()
    (webdataset / "shard-000000.tar").write_bytes(b"precious")
    (tmp_path / "foreign" / "manifest.json").parent.mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text("not ours")
    for dest, said in (
        (webdataset, "did not write (shard-000000.tar)"),
        (tmp_path / "foreign", "not a pixpro"),
    ):
        assert pack_main([str(src), str(dest), "--shard-size", "8KB"]) == 2
        assert said in capsys.readouterr().err
    assert (webdataset / "shard-000000.tar").read_bytes() == b"precious"
    assert (tmp_path / "foreign" / "manifest.json").read_text() == "not ours"
    for args in (["--workers", "0"], ["--workers=100000"], ["--shard-size", "100"], ["--shard-size=-1GB"]):
        assert pack_main([str(src), str(tmp_path / "z"), *args]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("pixpro: --"), line
    for args in (["--workers", "x"], ["--shard-size", "-1GB"]):  # what argparse itself refuses: one line
        with pytest.raises(SystemExit) as refused:
            pack_main([str(src), str(tmp_path / "z"), *args])
        (line,) = capsys.readouterr().err.splitlines()
        assert refused.value.code == 2 and line.startswith("pixpro pack: "), line
    assert not (tmp_path / "z").exists()
    assert pack_main([str(src), str(tmp_path / "y"), "--shard-size", "lots"]) == 2
    assert parse_size("1GB") == 10**9 and parse_size("256MiB") == 256 * 2**20

    shard = tmp_path / "packed" / "shard-000000.tar"  # a shard truncated on the store
    shard.write_bytes(shard.read_bytes()[:3000])
    assert pack_main([str(src), str(tmp_path / "packed"), "--shard-size", "8KB"]) == 2
    assert "shard-000000.tar is 3000 bytes" in capsys.readouterr().err
    images = ImageFolder(tmp_path / "packed")  # training skips what the truncation cut, and counts it
    with (
        pytest.warns(UserWarning, match="read failed"),
        pytest.warns(UserWarning, match="broken.jpg: undecodable when it was packed"),
    ):
        for i in range(len(images)):
            images.load(i)
    assert images.skipped >= 1

    index = tmp_path / "packed" / "index.npz"  # an index that does not match its shards
    arrays = dict(np.load(index))
    arrays["offset"] = arrays["offset"] + 10**9
    np.savez(index, **arrays)
    with pytest.raises(ValueError, match="points past the end of a shard"):
        PackedSource(tmp_path / "packed")


@pytest.mark.slow
def test_index_of_1_28m_entries_is_flat_and_cheap_in_forked_workers(tmp_path: Path) -> None:
    """Load time and per-worker memory growth after touching every entry in a forked worker."""
    n = 1_281_167
    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)]
    blob = "".join(names).encode()
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(s) for s in names], out=offsets[1:])
    root = tmp_path / "big"
    root.mkdir()
    np.savez(
        root / "index.npz",
        shard=(np.arange(n) // 1000).astype(np.uint32),
        offset=(np.arange(n) % 1000 * 1536).astype(np.int64),
        length=np.full(n, 1024, dtype=np.int64),
        label=(np.arange(n) % 1000).astype(np.int32),
        name_blob=np.frombuffer(blob, dtype=np.uint8),
        name_offsets=offsets,
    )
    shards = [
        {"name": f"shard-{s:06d}.tar", "size": 2_000_000, "sha256": "0" * 64} for s in range(n // 1000 + 1)
    ]
    (root / "manifest.json").write_text(
        json.dumps({"format": "pixpro-pack/1", "samples": n, "shards": shards, "undecodable": []})
    )
    del blob
    t0 = time.perf_counter()
    source = PackedSource(root)
    load_s = time.perf_counter() - t0
    assert len(source) == n
    flat_kb = _forked_growth_kb(lambda: sum(len(source.name(i)) + source.label(i) for i in range(n)))
    paths = [Path("/data/train", s) for s in names]  # what ImageFolder held before: the control
    listed_kb = _forked_growth_kb(lambda: sum(len(p.name) for p in paths))
    print(
        f"\n1.28 M-entry index: load {load_s:.2f} s; a forked worker touching every entry copies "
        f"{flat_kb / 1024:.1f} MB (flat arrays) vs {listed_kb / 1024:.0f} MB (Path objects)"
    )
    assert flat_kb < 8 * 1024 and listed_kb > 10 * flat_kb + 50 * 1024


def _forked_growth_kb(touch) -> int:
    """Private memory a forked child (a DataLoader worker) dirties by running ``touch``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = _rss_kb()
        touch()
        os.write(write, str(_rss_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 100))


def _rss_kb() -> int:
    """Private dirty memory of this process (kB): pages a forked child wrote, copy-on-write included
    (its RSS would not grow: a copied page replaces the shared one it had mapped)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_keeps_bytes_up_to_its_bound_and_never_changes_a_sample(tmp_path: Path, mode: str) -> None:
    src = _images(tmp_path / "src", n=12)
    assert pack_main([str(src), str(tmp_path / "packed"), "--workers", "1"]) == 0
    packed = PackedSource(tmp_path / "packed")
    sizes = [packed._length[i] for i in range(len(packed)) if packed.usable(i)]
    bound = int(sum(sizes) // 2)
    cache = CachedSource(packed, mode, bound, str(tmp_path / "cache") if mode == "disk" else None)
    usable = [i for i in range(len(packed)) if packed.usable(i)]
    first = [cache.read(i) for i in usable]
    second = [cache.read(i) for i in usable]
    assert first == second == [packed.read(i) for i in usable]
    assert cache.misses == len(usable) + (len(usable) - cache.hits)  # what did not fit is read again
    assert 0 < cache.hits < len(usable)  # about half fit under the bound
    if mode == "disk":
        held = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.bin"))
        assert 0 < held <= bound
        other = CachedSource(packed, "disk", bound, str(tmp_path / "cache"))  # another rank on the node
        assert [other.read(i) for i in usable] == first and other.hits == cache.hits


def test_pixpro_pack_console_script(tmp_path: Path) -> None:
    from tests.support.cli import PIXPRO

    src = _images(tmp_path / "src", n=5)
    run = [PIXPRO, "pack", str(src), str(tmp_path / "out"), "--workers", "1", "--json"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and json.loads(first.stdout)["action"] == "packed", first.stderr
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["action"] == "verified"
    bad = subprocess.run(
        [PIXPRO, "pack", str(tmp_path / "nope"), str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_pack_to_and_from_s3_uses_the_trainers_endpoint_and_fails_in_one_line(
    tmp_path: Path, moto_s3, raw_s3, monkeypatch, capsys
) -> None:
    """``PIXPRO_S3_ENDPOINT`` reaches both sides (a folder in S3 packed into S3); a store that does
    not answer is one line and exit 1, never a traceback."""
    from launch.store.s3 import s3_options
    from schemas.contract import S3_ENDPOINT_ENV

    bucket = "pixpro-fixdata-pack"
    if not raw_s3.exists(bucket):
        raw_s3.mkdir(bucket)
    src = _images(tmp_path / "src", n=6)
    raw_s3.put(str(src), f"{bucket}/{tmp_path.name}/src", recursive=True)
    monkeypatch.setenv(S3_ENDPOINT_ENV, moto_s3.endpoint)
    url = f"s3://{bucket}/{tmp_path.name}"
    assert pack_main([f"{url}/src", f"{url}/packed", "--shard-size", "8KB", "--workers", "2"]) == 0, (
        capsys.readouterr().err
    )
    folder, packed = FolderSource(src), open_source(f"{url}/packed", s3_options({}, None))
    assert isinstance(packed, PackedSource) and len(packed) == len(folder) == 7
    assert [packed.read(i) for i in range(7) if packed.usable(i)] == [
        folder.read(i) for i in range(7) if packed.usable(i)
    ]
    assert pack_main([f"{url}/src", f"{url}/packed", "--workers", "1"]) == 0  # verified, not rewritten
    capsys.readouterr()
    from tests.support.procs import free_port

    monkeypatch.setenv(S3_ENDPOINT_ENV, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert pack_main([f"{url}/src", str(tmp_path / "out"), "--workers", "1"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pixpro: ") and "Traceback" not in line, line
