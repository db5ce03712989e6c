"""The data path at ImageNet scale, measured side by side in one run.

1. Read + decode throughput (one process, the DataLoader worker's work minus augmentation) from a folder
   of JPEGs and from the same images packed (``pixpro pack``), on local disk and on S3 (moto over HTTP on
   127.0.0.1), with the files (or shard handles) opened per second.
2. Pack rate per core (``--workers 1``).
3. A 1.28 M-entry pack index: load time, and resident memory growth of a forked worker that touched
   every entry, against the same names as a list of ``pathlib.Path`` (what ImageFolder held before).

    python benches/bench_data.py [--images 1500] [--size 320]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.synthetic import noisy_jpeg  # noqa: E402
from launch.tools.pack import pack  # noqa: E402
from pixpro.data import decode_rgb  # noqa: E402
from pixpro.sources import FolderSource, PackedSource  # noqa: E402


def make_images(root: Path, n: int, size: int) -> int:
    """JPEGs of ImageNet's mean file size (~110 KB at 320 px) in 10 class folders."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        data = noisy_jpeg(rng, size, size, noise=0.6)
        path = root / f"n{i % 10:08d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    return total


def read_rate(source, limit_s: float = 20.0) -> tuple[float, float]:
    """(images/s, opens/s) reading and decoding every image once in index order, up to ``limit_s``."""
    opens = 0
    t0 = time.perf_counter()
    n = 0
    for i in range(len(source)):
        if isinstance(source, FolderSource):
            opens += 1
        decode_rgb(source.read(i))
        n += 1
        if time.perf_counter() - t0 > limit_s:
            break
    dt = time.perf_counter() - t0
    if isinstance(source, PackedSource):
        opens = len(source._handles) or len({int(source._shard[i]) for i in range(n)})
    return n / dt, opens / dt


def loader_rate(root: str, storage_options: dict | None = None, workers: int = 2) -> float:
    """End to end: a DataLoader with ``workers`` processes making two 224-px views per image (the
    trainer's dataset and transform), images/s over every image once."""
    from torch.utils.data import DataLoader

    from pixpro.augment import TwoViewTransform
    from pixpro.data import ImageFolder, TwoViewDataset

    dataset = TwoViewDataset(
        ImageFolder(root, min_size=224, storage_options=storage_options), TwoViewTransform(224), seed=0
    )
    keys = [(0, i) for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=32, sampler=keys, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(batch["index"]) for batch in loader)
    return n / (time.perf_counter() - t0)


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    return proc, url


def index_memory(n: int = 1_281_167) -> dict[str, float]:
    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(s) for s in names], out=offsets[1:])
        np.savez(
            root / "index.npz",
            shard=(np.arange(n) // 1000).astype(np.uint32),
            offset=np.zeros(n, dtype=np.int64),
            length=np.ones(n, dtype=np.int64),
            label=(np.arange(n) % 1000).astype(np.int32),
            name_blob=np.frombuffer("".join(names).encode(), dtype=np.uint8),
            name_offsets=offsets,
        )
        shards = [{"name": f"s{s}", "size": 10, "sha256": ""} for s in range(n // 1000 + 1)]
        (root / "manifest.json").write_text(
            json.dumps({"format": "pixpro-pack/1", "samples": n, "shards": shards})
        )
        t0 = time.perf_counter()
        source = PackedSource(root)
        load_s = time.perf_counter() - t0
        flat = _forked_growth_mb(lambda: sum(len(source.name(i)) for i in range(n)))
        paths = [Path("/data/imagenet/train", s) for s in names]
        listed = _forked_growth_mb(lambda: sum(len(p.name) for p in paths))
    return {"load_s": load_s, "flat_mb": flat, "paths_mb": listed}


def _forked_growth_mb(touch) -> float:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = _rss_kb()
        touch()
        os.write(write, str(_rss_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 64)) / 1024


def _rss_kb() -> int:
    """Private dirty memory of this process (kB): pages a forked child wrote, copy-on-write included
    (its RSS would not grow: a copied page replaces the shared one it had mapped)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        nbytes = make_images(work / "folder", args.images, args.size)
        t0 = time.perf_counter()
        pack(str(work / "folder"), str(work / "packed"), 8 * 10**6, workers=1, progress=False)
        pack_rate = args.images / (time.perf_counter() - t0)

        moto, endpoint = start_moto()
        try:
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
            fs.mkdir("bench")
            fs.put(str(work / "folder"), "bench/folder", recursive=True)
            fs.put(str(work / "packed"), "bench/packed", recursive=True)
            opts = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
            ends = [
                ("local disk", loader_rate(str(work / "folder")), loader_rate(str(work / "packed"))),
                (
                    "S3 (moto, HTTP)",
                    loader_rate("s3://bench/folder", opts),
                    loader_rate("s3://bench/packed", opts),
                ),
            ]
            rows = []
            for where, folder, packed in (
                ("local disk", FolderSource(work / "folder"), PackedSource(work / "packed")),
                (
                    "S3 (moto, HTTP)",
                    FolderSource("s3://bench/folder", opts),
                    PackedSource("s3://bench/packed", opts),
                ),
            ):
                f_rate, f_opens = read_rate(folder)
                p_rate, p_opens = read_rate(packed)
                rows.append((where, f_rate, p_rate, f_opens, p_opens))
        finally:
            moto.terminate()
        mem = index_memory()

    kb = nbytes / args.images / 1024
    print(f"\n{args.images} JPEGs of {args.size} px, {kb:.0f} KB each, 8 MB shards; one process, 1 thread")
    print("\n| read + decode, one process | folder img/s | packed img/s | ratio | opens/s folder | packed |")
    print("|---|---|---|---|---|---|")
    for where, f_rate, p_rate, f_opens, p_opens in rows:
        ratio = p_rate / f_rate
        print(f"| {where} | {f_rate:.0f} | {p_rate:.0f} | {ratio:.2f}x | {f_opens:.0f} | {p_opens:.2f} |")
    print("\n| DataLoader, 2 workers, two 224-px views | folder img/s | packed img/s | ratio |")
    print("|---|---|---|---|")
    for where, f_rate, p_rate in ends:
        print(f"| {where} | {f_rate:.0f} | {p_rate:.0f} | {p_rate / f_rate:.2f}x |")
    print(
        f"\npack rate: {pack_rate:.0f} images/s per core (read + full decode check + tar), "
        f"ImageNet-1k on 32 cores ~ {1_281_167 / (pack_rate * 32) / 60:.0f} min"
    )
    print(
        f"1.28 M-entry index: load {mem['load_s']:.2f} s; forked worker that touched every entry: "
        f"+{mem['flat_mb']:.1f} MB (flat arrays) vs +{mem['paths_mb']:.0f} MB (a list of Path objects)"
    )


if __name__ == "__main__":
    main()
