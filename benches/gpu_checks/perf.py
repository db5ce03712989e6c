"""The "throughput" and "compile" checks: the trainer's step against the network's own floor, and
torch.compile of the PixPro module inside that step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from gpu_checks.common import NA_CPU, Ctx, Deadline, autocast_for, fixed_batch, make_trainer, peak_gib, timed
from gpu_checks.plan import GOALS
from gpu_checks.record import Rec

GOAL_IMG_PER_S = GOALS["img_per_s_per_gpu"]
GOAL_STEP_OVER_FLOOR = GOALS["step_over_floor"]


def floor_step_fn(trainer: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The same network's own work: both views through the online backbone forward and backward, two
    target forwards (as benches/bench_step.py), in the trainer's precision and memory format."""
    from launch.builders import device_views

    online, target = trainer.model.backbone, trainer.model.target_backbone
    v1, v2, _, _ = device_views(trainer.dataset.transform, batch, trainer.device)
    v1, v2 = (v.contiguous(memory_format=trainer.memory_format) for v in (v1, v2))

    def step() -> None:
        with autocast_for(trainer):
            loss = online(v1).float().mean() + online(v2).float().mean()
            with torch.no_grad():
                target(v1)
                target(v2)
        online.zero_grad(set_to_none=True)
        loss.backward()

    return step


def interleaved(
    ctx: Ctx, dl: Deadline, fns: dict[str, Callable[[], Any]], per_round: int, rounds: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds until rounds or deadline."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        if r >= 2 and dl.left() < 3:
            break
        for name, fn in fns.items():
            times[name].append(timed(ctx, fn, per_round))
    return {k: statistics.median(v) for k, v in times.items()}


def check_throughput(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """The model's rate (data already on the device) at the recipe's batch, over its floor, peak memory.
    The step queues without a host sync, so back-to-back steps measure the device, not the host."""
    trainer = make_trainer(ctx, ctx.work / "throughput")
    b = ctx.s["batch"]
    batch = fixed_batch(trainer, b, on_device=True)

    def pix() -> None:
        trainer._train_step(trainer.model, batch)

    floor = floor_step_fn(trainer, batch)
    for _ in range(1 if ctx.cpu else 3):  # warm-up: cuDNN heuristics, allocator, LARS state
        pix()
        floor()
    per_round, rounds = (1, 2) if ctx.cpu else (5, 6)
    med = interleaved(ctx, dl, {"pixpro": pix, "floor": floor}, per_round, rounds)
    n: dict[str, Any] = {
        "batch": b,
        "amp_dtype": str(trainer.amp_dtype),
        "memory_format": str(trainer.memory_format),
        "pixpro_step_ms": round(med["pixpro"] * 1000, 2),
        "floor_step_ms": round(med["floor"] * 1000, 2),
        "pixpro_img_per_s": round(b / med["pixpro"], 1),
        "floor_img_per_s": round(b / med["floor"], 1),
        "step_over_floor": round(med["pixpro"] / med["floor"], 3),
    }
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
        timed(ctx, pix, 2)
        n["peak_memory_gib"] = peak_gib(ctx)
        torch.cuda.reset_peak_memory_stats()
        timed(ctx, floor, 2)
        n["floor_peak_memory_gib"] = peak_gib(ctx)
    else:
        n["peak_memory_gib"] = NA_CPU
    n["goal_img_per_s_met"] = n["pixpro_img_per_s"] >= GOAL_IMG_PER_S if not ctx.cpu else NA_CPU
    n["goal_ratio_met"] = n["step_over_floor"] <= GOAL_STEP_OVER_FLOOR if not ctx.cpu else NA_CPU
    rec.set(**n)
    rec.summary(
        f"PixPro {n['pixpro_img_per_s']:.0f} img/s (goal {GOAL_IMG_PER_S}), floor "
        f"{n['floor_img_per_s']:.0f} img/s, step/floor {n['step_over_floor']:.3f} "
        f"(goal {GOAL_STEP_OVER_FLOOR})" + (f", peak {n['peak_memory_gib']} GiB" if not ctx.cpu else "")
    )
    if not ctx.cpu and dl.left() > 10:
        # The trainer leaves cudnn.benchmark off; what turning it on would give, same batch.
        torch.backends.cudnn.benchmark = True
        timed(ctx, pix, 3)
        bench = interleaved(ctx, dl, {"pixpro": pix}, 5, 3)["pixpro"]
        torch.backends.cudnn.benchmark = False
        rec.set(cudnn_benchmark_img_per_s=round(b / bench, 1))
    return "pass", ""


def check_compile(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """torch.compile of the PixPro module inside the trainer's step: compile time, graphs and breaks,
    speed-up, recompiles after warm-up (must be 0). The compile itself is bounded only by the check's
    budget: a compile that does not finish is this check's timeout and costs no other check."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    backend = "aot_eager" if ctx.cpu else "inductor"
    trainer = make_trainer(ctx, ctx.work / "compile")
    batch = fixed_batch(trainer, ctx.s["batch"], on_device=True)
    eager_model = trainer.model

    def eager() -> None:
        trainer._train_step(eager_model, batch)

    timed(ctx, eager, 1 if ctx.cpu else 2)
    rec.set(backend=backend, eager_step_ms_before_compile=round(timed(ctx, eager, 1) * 1000, 2))
    counters.clear()
    compiled = torch.compile(eager_model, backend=backend)

    def comp() -> None:
        trainer._train_step(compiled, batch)

    t = time.perf_counter()
    comp()
    ctx.sync()
    rec.set(compile_s=round(time.perf_counter() - t, 1))
    timed(ctx, comp, 1 if ctx.cpu else 2)
    before = {k: dict(v) for k, v in counters.items()}
    rec.set(
        graphs=before.get("stats", {}).get("unique_graphs", 0),
        graph_breaks=sum(before.get("graph_break", {}).values()),
        graph_break_reasons=sorted(before.get("graph_break", {}))[:5],
    )
    dl.check("compiled warm-up")
    med = interleaved(ctx, dl, {"eager": eager, "compiled": comp}, 1 if ctx.cpu else 5, 2 if ctx.cpu else 5)
    after = {k: dict(v) for k, v in counters.items()}
    recompiles = after.get("frames", {}).get("total", 0) - before.get("frames", {}).get("total", 0)
    speedup = med["eager"] / med["compiled"]
    rec.set(
        eager_step_ms=round(med["eager"] * 1000, 2),
        compiled_step_ms=round(med["compiled"] * 1000, 2),
        speedup=round(speedup, 3),
        helps=speedup > 1.03,
        recompiles_after_warmup=recompiles,
    )
    rec.summary(
        f"{backend}: compile {rec.numbers['compile_s']:.0f} s, {rec.numbers['graphs']} graphs, "
        f"{rec.numbers['graph_breaks']} breaks, {recompiles} recompiles after warm-up, "
        f"step {med['eager'] * 1000:.0f} -> {med['compiled'] * 1000:.0f} ms ({speedup:.2f}x"
        f"{'' if speedup > 1.03 else ', does not help'})"
    )
    if recompiles:
        return "fail", f"{recompiles} recompiles after warm-up on a fixed batch"
    return "pass", "CPU runs aot_eager (no inductor codegen)" if ctx.cpu else ""
