"""PixPro step time over its floor, CPU bf16 autocast against fp32, and augmentation throughput per core.

Floor = the backbone's own work for the same batch: two views through the online backbone forward and
backward, plus two target-backbone forwards. The PixPro step adds projectors, PPM, positive masks,
losses, the LARS update and the EMA update. Both are timed in the same process, interleaved, and the
ratio of medians is reported (the machine is shared, so absolute times swing).

The ``cpu_autocast`` row times the same PixPro step in fp32 and under bf16 autocast with
channels_last (what ``cpu_autocast: true`` in a spec turns on), interleaved, as a ratio of medians.

    python benches/bench_step.py [--backbone resnet50] [--size 224] [--batch 8] [--hidden 4096]
                                 [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pixpro.augment import TwoViewTransform
from pixpro.builder import PixPro
from pixpro.lars import LARS, lars_param_groups


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pixpro_step(
    backbone: str, size: int, batch: int, hidden: int, bf16: bool = False
) -> tuple[PixPro, tuple[torch.Tensor, torch.Tensor], Callable[[], None]]:
    """A model, its two fixed random views and one full training step on them (EMA update, forward,
    backward, LARS); ``bf16``: under CPU bf16 autocast with channels_last, as ``cpu_autocast`` runs."""
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = PixPro(backbone=backbone, projector_hidden=hidden).train().to(memory_format=memory_format)
    opt = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    views = tuple(torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format) for _ in range(2))
    box = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(batch, 1)
    c2 = torch.tensor([0.1, 0.1, 0.9, 0.9]).repeat(batch, 1)

    def step() -> None:
        model.update_target(0.99)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(*views, box, c2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return model, views, step


def step_ratio(backbone: str, size: int, batch: int, reps: int, hidden: int) -> dict:
    torch.manual_seed(0)
    model, (v1, v2), step = pixpro_step(backbone, size, batch, hidden)

    online, target = model.backbone, model.target_backbone

    def floor_step() -> None:
        loss = online(v1).float().mean() + online(v2).float().mean()
        with torch.no_grad():
            target(v1)
            target(v2)
        online.zero_grad(set_to_none=True)
        loss.backward()

    step(), floor_step()  # warm-up
    full, floor = [], []
    for _ in range(reps):  # interleave so both see the same machine load
        full += _time(step, 1)
        floor += _time(floor_step, 1)
    f, b = statistics.median(full), statistics.median(floor)
    return {
        "backbone": backbone,
        "size": size,
        "batch": batch,
        "hidden": hidden,
        "pixpro_s": f,
        "floor_s": b,
        "ratio": f / b,
    }


def cpu_autocast_speedup(backbone: str, size: int, batch: int, reps: int, hidden: int) -> dict:
    """Median PixPro step time in fp32 and in bf16 autocast + channels_last, interleaved."""
    torch.manual_seed(0)
    steps = {
        name: pixpro_step(backbone, size, batch, hidden, bf16=name == "bf16")[2] for name in ("fp32", "bf16")
    }
    for step in steps.values():
        step()  # warm-up (oneDNN picks its kernels on the first call)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name] += _time(step, 1)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"fp32_s": fp32, "bf16_s": bf16, "speedup": fp32 / bf16}


def augment_rate(reps: int) -> dict:
    """Two-view samples/s on one core from a 500x375 image at 224 (box coordinates and rotation maps)."""
    from torchvision.transforms import v2

    torch.set_num_threads(1)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    rows = {}
    for name, spatial in (
        ("crop+flip (boxes)", ()),
        (
            "+ rotation (coordinate maps)",
            (v2.RandomRotation(30, interpolation=v2.InterpolationMode.BILINEAR),),
        ),
    ):
        t = TwoViewTransform(crop_size=224, spatial=spatial)
        g = torch.Generator()
        for i in range(5):
            t(image, g.manual_seed(i))
        times = _time(lambda t=t, g=g: t(image, g.manual_seed(7)), reps * 20)
        rows[name] = 1.0 / statistics.median(times)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    r = step_ratio(a.backbone, a.size, a.batch, a.reps, a.hidden)
    print(
        "| backbone | input | batch | projector hidden | PixPro step (s) | floor (s) | ratio (goal <= 1.10) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['backbone']} | {r['size']} px | {r['batch']} | {r['hidden']} | {r['pixpro_s']:.3f} | "
        f"{r['floor_s']:.3f} | {r['ratio']:.3f} |"
    )
    print()
    c = cpu_autocast_speedup("resnet18", 160, 16, a.reps, 1024)
    print(
        "| CPU PixPro step (resnet18, 160 px, batch 16, hidden 1024) | fp32 (s) "
        "| bf16 autocast + channels_last (s) | speedup |"
    )
    print("|---|---|---|---|")
    print(f"| {a.threads} thread(s) | {c['fp32_s']:.3f} | {c['bf16_s']:.3f} | {c['speedup']:.2f}x |")
    print()
    print("| two-view augmentation, 500x375 -> 224, 1 core | samples/s |")
    print("|---|---|")
    for name, rate in augment_rate(a.reps).items():
        print(f"| {name} | {rate:.1f} |")


if __name__ == "__main__":
    main()
