"""The "input" and "photometric" checks: the trainer's DataLoader against the model's rate, and the
photometric steps batched on the device (``data.augment_on: device``) against the workers' own."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any, cast

import torch

from gpu_checks.common import NA_CPU, Ctx, Deadline, spec_dict, timed
from gpu_checks.perf import GOAL_IMG_PER_S
from gpu_checks.record import Rec


def check_input(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """The trainer's DataLoader over the demo PNGs with N workers against the model's rate."""
    from launch.builders import build_data
    from launch.collectives import DistEnv
    from schemas import parse_spec

    b = ctx.s["batch"]
    spec = parse_spec(spec_dict(ctx))
    dataset, _ = build_data(spec, DistEnv(0, 0, 1))
    th = ctx.results.get("throughput", {}).get("numbers", {})
    model_rate = th.get("pixpro_img_per_s")
    source = "throughput check" if model_rate else "goal (throughput check not run)"
    model_rate = model_rate or float(GOAL_IMG_PER_S)
    rec.set(
        model_img_per_s=model_rate,
        model_rate_from=source,
        images=f"PNG {ctx.s['image_size']} px, crop {ctx.s['crop']}",
    )
    rates: dict[str, float] = {}
    pinned: bool | str = NA_CPU
    for nw in ctx.s["workers"]:
        if dl.left() < ctx.s["window_s"] + 3:
            break
        rate, pinned = loader_rate(ctx, spec, dataset, nw)
        rates[str(nw)] = round(rate, 1)
        rec.set(img_per_s_by_workers=rates, pinned=pinned)
    if not rates:
        return "timeout", "no worker count measured"
    most = max(int(k) for k in rates)
    per_worker = rates[str(most)] / max(most, 1)
    need = math.ceil(model_rate / per_worker) if per_worker > 0 else None
    rec.set(
        img_per_s_per_worker=round(per_worker, 1),
        workers_needed_per_gpu=need,
        cores_needed_per_gpu=(need or 0) + 1,
    )
    if dl.left() >= ctx.s["window_s"] + 3:  # data.augment_on: device, at the largest worker count
        device_rate = device_path_rate(ctx, spec, most)
        per = device_rate / max(most, 1)
        rec.set(
            device_path_img_per_s=round(device_rate, 1),
            device_path_workers_needed_per_gpu=math.ceil(model_rate / per) if per > 0 else None,
        )
    if not ctx.cpu:
        rec.set(**_h2d(ctx, b))
    rec.summary(
        f"{', '.join(f'{k} workers {v:.0f}' for k, v in rates.items())} img/s; "
        f"{per_worker:.0f} img/s per worker "
        f"-> {need} workers (+1 core for the trainer) per GPU for {model_rate:.0f} img/s ({source})"
        + (
            f"; augment_on device: {rec.numbers['device_path_workers_needed_per_gpu']} workers"
            if "device_path_img_per_s" in rec.numbers
            else ""
        )
    )
    if not ctx.cpu and pinned is not True:
        return "fail", "the trainer's loader did not return pinned memory on CUDA"
    return "pass", ""


def check_photometric(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """``data.augment_on: device``: the photometric steps batched on the device against the worker's result
    (computed on the CPU), and their cost per batch against the model's step."""
    from pixpro.augment import TwoCrops, TwoViewTransform
    from pixpro.data import sample_generator

    b, crop = ctx.s["batch"], ctx.s["crop"]
    transform = TwoViewTransform(crop_size=crop, photometric_later=True)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 2 * crop, 2 * crop), generator=g, dtype=torch.uint8)
    image = torch.nn.functional.avg_pool2d(image[None].float(), 5, 1, 2)[0].to(torch.uint8)  # some texture
    crops = [cast(TwoCrops, transform(image, sample_generator(0, 0, i))) for i in range(b)]
    views = torch.stack([c.view1 for c in crops] + [c.view2 for c in crops])
    params = torch.stack([c.params1 for c in crops] + [c.params2 for c in crops])
    photometric = transform.view2.photometric  # view 2's recipe: every step can fire (solarize too)
    # what the workers produce with augment_on: worker (photometric_cpu's compiled steps, one view each)
    finished = [photometric.finish(v, p.tolist()) for v, p in zip(views, params, strict=True)]
    worker = photometric.normalize(torch.stack(finished))
    on_device = views.to(ctx.device)
    device = photometric(on_device, params).cpu()
    std = torch.tensor(transform.view2.recipe.std).view(1, 3, 1, 1)
    levels = ((device - worker) * std * 255).abs()
    per_batch = timed(ctx, lambda: photometric(on_device, params), 5 if ctx.cpu else 20)
    rate = ctx.results.get("throughput", {}).get("numbers", {}).get("pixpro_img_per_s")
    step_s = b / rate if rate else None
    rec.set(
        max_diff_levels=round(float(levels.max()), 4),
        share_differing=float((levels > 1e-3).float().mean()),
        ms_per_batch=round(per_batch * 1000, 2),
        views=2 * b,
        share_of_step=round(per_batch / step_s, 4) if step_s else None,
    )
    rec.summary(
        f"{2 * b} views in {per_batch * 1000:.1f} ms on {ctx.device.type}; device vs worker: max "
        f"{float(levels.max()):.3f} grey levels, {float((levels > 1e-3).float().mean()):.2e} of values differ"
    )
    if float(levels.max()) > 1.0 + 1e-3:
        return "fail", "device views differ from the worker's by more than one grey level"
    return "pass", ""


def device_path_rate(ctx: Ctx, spec: Any, workers: int) -> float:
    """img/s of the loader with ``augment_on: device``, its photometric steps run on the device per batch."""
    from launch.builders import build_data
    from launch.collectives import DistEnv

    data = spec.data.model_copy(update={"augment_on": "device", "num_workers": workers})
    spec_d = spec.model_copy(update={"data": data})
    dataset, _ = build_data(spec_d, DistEnv(0, 0, 1))
    return loader_rate(ctx, spec_d, dataset, workers)[0]


def loader_rate(ctx: Ctx, spec: Any, dataset: Any, workers: int) -> tuple[float, bool | str]:
    """img/s of the trainer's loader (its settings: pin_memory, reused batch buffers) with ``workers``,
    each batch taken to the device and finished there as the train step does; and whether it came pinned.
    The files repeat so an epoch outlasts the window (page cache: decode + augment, not disk, measured)."""
    from launch.batches import release
    from launch.builders import device_views
    from launch.sampler import ResumableSampler
    from launch.train import Trainer

    b = ctx.s["batch"]
    repeated = Repeated(dataset, max(1, math.ceil(400 * b / len(dataset))))
    sampler = ResumableSampler(len(repeated), seed=0, rank=0, world_size=1, batch_size=b, drop_last=True)
    spec_n = spec.model_copy(update={"data": spec.data.model_copy(update={"num_workers": workers})})
    holder = SimpleNamespace(dataset=repeated, sampler=sampler, spec=spec_n, device=ctx.device, _loader=None)
    loader = Trainer.loader(cast(Trainer, holder))
    pinned: bool | str = NA_CPU
    it = iter(loader)
    release(loader, next(it))
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < ctx.s["window_s"]:
        batch = next(it, None)
        if batch is None:  # the epoch ran out before the window: the rate is still right
            break
        if not ctx.cpu:
            pinned = bool(batch["view1"].is_pinned())
        device_views(dataset.transform, batch, ctx.device)
        release(loader, batch)
        count += b
    ctx.sync()
    return count / (time.perf_counter() - t), pinned


class Repeated(torch.utils.data.Dataset):
    """A ``(epoch, index)`` dataset ``times`` over, so one epoch of the loader outlasts a timing window."""

    def __init__(self, dataset: Any, times: int) -> None:
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.dataset[(epoch, index % len(self.dataset))]


def _h2d(ctx: Ctx, b: int) -> dict[str, Any]:
    """Host-to-device copy of one batch of views, pinned (as the loader gives) and pageable."""
    host = torch.randn(2 * b, 3, ctx.s["crop"], ctx.s["crop"])
    out: dict[str, Any] = {}
    for name, src in (("pinned", host.pin_memory()), ("pageable", host)):

        def copy(src: torch.Tensor = src) -> torch.Tensor:
            return src.to(ctx.device, non_blocking=True)

        copy()
        s = timed(ctx, copy, 5)
        out[f"h2d_{name}_gb_per_s"] = round(src.numel() * 4 / s / 1e9, 1)
    return out
