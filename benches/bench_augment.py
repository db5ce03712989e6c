"""Decode + two views per core, pixpro against the official PixPro pipeline, measured side by side.

Every path runs in this one process on one thread (a DataLoader worker's setting), over the same JPEGs,
in interleaved rounds so a busy machine slows all of them alike; the table gives the median rate of each
path, its ratio to the official pipeline, and the cores per GPU it takes to feed ResNet-50 at
1,500 img/s. Paths:

- official: PIL decode + its BYOL transforms (``contrast/data/transform.py``, loaded from a snapshot of
  github.com/zdaxie/PixPro at bench time: ``--official`` names a checkout or a bare git dir; the code
  is never copied into this repository);
- worker: ``data.augment_on: worker`` (decode, crop, flip, colour, grey, blur, solarize; uint8 out);
- worker + rotation: the same with ``RandomRotation(30)`` (image and coordinate map warped once);
- device, worker part: ``data.augment_on: device``, what a worker still does (decode, crop, flip, draw);
- device, on this CPU: the batched photometric steps of that path, per sample, run here on the CPU.

    python benches/bench_augment.py [--official PATH] [--images 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.synthetic import noisy_jpeg  # noqa: E402
from pixpro.augment import TwoViewTransform  # noqa: E402
from pixpro.data import decode_rgb, sample_generator  # noqa: E402

TARGET_IMG_S = 1500  # ResNet-50 on one modern GPU with bf16 (the figure)
OFFICIAL_FILES = ("transform.py", "transform_coord.py", "rand_augment.py")
MIRROR = Path("/work/.mirror/zdaxie+PixPro/repo")  # where this workplace's fetch tool puts the snapshot


def make_jpegs(n: int) -> list[bytes]:
    """ImageNet-like JPEGs: ImageNet's common sizes (500x375, 375x500, 500x333, 500x500), the noise set
    so the mean file is ImageNet's ~110 KB."""
    rng = np.random.default_rng(0)
    sizes = [(375, 500), (500, 375), (333, 500), (375, 500), (500, 500)]
    return [noisy_jpeg(rng, *sizes[i % len(sizes)], noise=0.4) for i in range(n)]


def load_official(where: Path | None, into: Path) -> Callable[[bytes], object] | None:
    """The official BYOL transform pair as ``bytes -> (view, coord) x 2``, or None when no snapshot."""
    env = os.environ.get("PIXPRO_OFFICIAL")
    candidates = [where] if where else [Path(env) if env else None, MIRROR]
    package = into / "official_pixpro_data"
    package.mkdir(parents=True, exist_ok=True)
    for src in candidates:
        if not src or not src.exists():
            continue
        for name in OFFICIAL_FILES:
            if (src / "contrast" / "data" / name).exists():  # a checkout
                text = (src / "contrast" / "data" / name).read_text()
            else:  # a bare git directory
                text = subprocess.run(
                    ["git", f"--git-dir={src}", "show", f"HEAD:contrast/data/{name}"],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
            (package / name).write_text(text)
        (package / "__init__.py").write_text("")
        sys.path.insert(0, str(into))
        transform = importlib.import_module("official_pixpro_data.transform")
        return _official_pair(*transform.get_transform("BYOL", 0.08, 224))
    return None


def _official_pair(t1: Callable, t2: Callable) -> Callable[[bytes], object]:
    def official(data: bytes) -> object:
        # the official pil_loader: Image.open on the bytes, then convert("RGB")
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return t1(image), t2(image)

    return official


def device_part(transform: TwoViewTransform, jpegs: list[bytes], batch: int = 32) -> Callable[[int], None]:
    """Per-sample cost of the batched photometric steps on this CPU (a batch of ``batch`` samples)."""
    crops = [transform(decode_rgb(jpegs[i % len(jpegs)]), sample_generator(0, 0, i)) for i in range(batch)]
    v1, v2 = torch.stack([c.view1 for c in crops]), torch.stack([c.view2 for c in crops])
    p1, p2 = torch.stack([c.params1 for c in crops]), torch.stack([c.params2 for c in crops])

    def run(i: int) -> None:
        if i % batch == 0:
            transform.view1.photometric(v1, p1)
            transform.view2.photometric(v2, p2)

    return run


def loader_rates(jpegs: list[bytes], where: Path, seconds: float = 8.0) -> dict[str, float]:
    """Samples/s through a DataLoader with one worker, batch 32: the worker's read, decode and augment,
    the collation into shared memory and the hand-over to the main process. "stock": torch's collate
    (new shared memory every batch); "trainer": the trainer's (``launch.batches``: buffers reused, uint8
    views on both paths, the batch released after use as the train loop does)."""
    from torch.utils.data import DataLoader

    from launch.batches import loader_collate, release
    from pixpro.data import ImageFolder, TwoViewDataset

    for i, data in enumerate(jpegs):
        (where / f"{i:05d}.jpg").write_bytes(data)
    out = {}
    for name, later, trainer in (
        ("worker path, stock (float32)", False, False),
        ("worker path, trainer", False, True),
        ("device path, stock", True, False),
        ("device path, trainer", True, True),
    ):
        transform = TwoViewTransform(photometric_later=later, normalize_later=trainer)
        dataset = TwoViewDataset(ImageFolder(where), transform, seed=0)
        keys = [(e, i) for e in range(1000) for i in range(len(dataset))]
        collate = loader_collate(1) if trainer else None
        loader = DataLoader(dataset, batch_size=32, sampler=keys, num_workers=1, collate_fn=collate)
        it = iter(loader)
        release(loader, next(it))
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = next(it)
            count += len(batch["index"])
            release(loader, batch)
        out[f"DataLoader, 1 worker, {name}"] = count / (time.perf_counter() - t0)
        del it, loader
    return out


def rate(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", type=Path, default=None, help="PixPro checkout or bare git dir")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    jpegs = make_jpegs(args.images)
    n = len(jpegs)

    from torchvision.transforms import v2

    # as the trainer runs them: the finished views leave the worker as uint8 levels (normalized on device)
    worker = TwoViewTransform(normalize_later=True)
    rotation = TwoViewTransform(
        spatial=[v2.RandomRotation(30, interpolation=v2.InterpolationMode.BILINEAR)], normalize_later=True
    )
    later = TwoViewTransform(photometric_later=True)
    paths: dict[str, Callable[[int], object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        official = load_official(args.official, Path(tmp))
        if official is not None:
            paths["official (PIL, BYOL)"] = lambda i: official(jpegs[i % n])
        paths["pixpro worker"] = lambda i: worker(decode_rgb(jpegs[i % n]), sample_generator(0, 0, i))
        paths["pixpro worker + rotation"] = lambda i: rotation(
            decode_rgb(jpegs[i % n]), sample_generator(0, 0, i)
        )
        paths["pixpro device: worker part"] = lambda i: later(
            decode_rgb(jpegs[i % n]), sample_generator(0, 0, i)
        )
        paths["pixpro device: its part on this CPU"] = device_part(later, jpegs)
        paths["decode only (torchvision)"] = lambda i: decode_rgb(jpegs[i % n])

        for fn in paths.values():  # warm-up
            rate(fn, 4)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                rates[name].append(rate(fn, 2 * n))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        folder = Path(tmp, "jpegs")
        folder.mkdir()
        medians.update(loader_rates(jpegs, folder))

    base = medians.get("official (PIL, BYOL)")
    kb = sum(map(len, jpegs)) / n / 1e3
    print(f"\n{n} JPEGs (mean {kb:.0f} KB), one thread, {args.rounds} interleaved rounds")
    print(f"{'path':40s} {'samples/s/core':>15s} {'vs official':>12s} {'cores @1500/s':>14s}")
    for name, r in medians.items():
        ratio = f"{r / base:.2f}x" if base else "-"
        print(f"{name:40s} {r:15.0f} {ratio:>12s} {TARGET_IMG_S / r:14.1f}")
    both = 1 / (
        1 / medians["pixpro device: worker part"] + 1 / medians["pixpro device: its part on this CPU"]
    )
    print(f"\ndevice path with both parts on CPU cores: {both:.0f} samples/s/core")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "rounds": rates}, indent=2))


if __name__ == "__main__":
    main()
