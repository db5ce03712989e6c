"""PixPro step time over its floor, CPU bf16 autocast against fp32, and augmentation throughput per core.

Floor = the backbone's own work for the same batch: two views through the online backbone forward and
backward, plus two target-backbone forwards. The PixPro step adds projectors, PPM, positive masks,
losses, the LARS update and the EMA update. Both are timed in the same process, interleaved, and the
ratio of medians is reported (the machine is shared, so absolute times swing).

The ``cpu_autocast`` row times the same PixPro step in fp32 and under bf16 autocast with
channels_last (what ``cpu_autocast: true`` in a spec turns on), interleaved, as a ratio of medians.

    python benches/bench_step.py [--backbone resnet50] [--size 224] [--batch 8] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def step_ratio(backbone: str, size: int, batch: int, reps: int, hidden: int) -> dict:
    torch.manual_seed(0)
    model = PixPro(backbone=backbone, projector_hidden=hidden).train()
    opt = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    v1, v2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    box = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(batch, 1)
    c2 = torch.tensor([0.1, 0.1, 0.9, 0.9]).repeat(batch, 1)

    def pixpro_step() -> None:
        model.update_target(0.99)
        out = model(v1, v2, box, c2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    online, target = model.backbone, model.target_backbone

    def floor_step() -> None:
        loss = online(v1).float().mean() + online(v2).float().mean()
        with torch.no_grad():
            target(v1)
            target(v2)
        online.zero_grad(set_to_none=True)
        loss.backward()

    pixpro_step(), floor_step()  # warm-up
    full, floor = [], []
    for _ in range(reps):  # interleave so both see the same machine load
        full += _time(pixpro_step, 1)
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
    models = {}
    for name, memory_format in (("fp32", torch.contiguous_format), ("bf16", torch.channels_last)):
        model = PixPro(backbone=backbone, projector_hidden=hidden).train().to(memory_format=memory_format)
        models[name] = (model, LARS(lars_param_groups(model, 1e-5), lr=0.1), memory_format)
    views = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    box = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(batch, 1)
    c2 = torch.tensor([0.1, 0.1, 0.9, 0.9]).repeat(batch, 1)

    def step(name: str) -> None:
        model, opt, memory_format = models[name]
        v1, v2 = (v.contiguous(memory_format=memory_format) for v in views)
        model.update_target(0.99)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            out = model(v1, v2, box, c2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step("fp32"), step("bf16")  # warm-up (oneDNN picks its kernels on the first call)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(reps):
        for name in times:
            times[name] += _time(lambda name=name: step(name), 1)
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
