"""The "step_*" checks: trainer steps on one fixed batch in each precision and memory format.

Each step is ``Trainer._train_step`` followed by ``Trainer._read_step`` (the loss on the host, as at a
logging step), so the loss is checked finite and falling; one step is run without the read under a
host-sync counter: a non-logging step must make none in bf16, and only GradScaler's overflow read in fp16.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from gpu_checks.common import CheckTimeout, Ctx, Deadline, fixed_batch, make_trainer, one_line, peak_gib
from gpu_checks.record import Rec
from gpu_checks.syncs import step_sync_ops, step_syncs


def _step_check(ctx: Ctx, rec: Rec, dl: Deadline, precision: str, channels_last: bool) -> tuple[str, str]:
    steps, b = ctx.s["steps"], ctx.s["step_batch"]
    # On CPU only the channels_last bf16 check takes the autocast path (see common.spec_dict); the
    # contiguous one trains as the trainer does there by default, in fp32.
    trainer = make_trainer(
        ctx,
        ctx.work / f"step_{precision}_{channels_last}",
        precision=precision,
        channels_last=channels_last,
        cpu_autocast=channels_last,
        data__batch_size=b,
        optim__max_steps=steps,
    )
    batch = fixed_batch(trainer, b, on_device=False)
    rec.set(
        batch=b,
        amp_dtype=str(trainer.amp_dtype),
        memory_format=str(trainer.memory_format),
        grad_scaler=trainer.scaler.is_enabled(),
    )
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    times: list[float] = []
    probe = min(3, steps // 2)  # a step after the first ones (lazy init, cuDNN heuristics)
    syncs: dict[str, Any] = {}
    status, reason = "pass", ""

    def step() -> None:
        trainer._train_step(trainer.model, batch)
        trainer.step += 1

    try:
        for i in range(steps):
            dl.check(f"step {i} of {steps}")
            t = time.perf_counter()
            if i == probe:
                syncs = step_syncs(ctx.cpu, step)
            elif i == probe + 1 and not ctx.cpu:
                rec.set(sync_ops_counted=step_sync_ops(step))  # HostSyncCounter's view of a GPU step
            else:
                step()
            losses.append(trainer._read_step())  # drains the device: the step's time ends here
            if i != probe and not (i == probe + 1 and not ctx.cpu):  # counted steps run slower
                times.append(time.perf_counter() - t)
            if i % 10 == 9:
                rec.set(losses=[round(v, 5) for v in losses])
    except CheckTimeout as exc:
        status, reason = "timeout", f"{exc}; {len(losses)} steps done"
    except Exception as exc:  # the trainer's verdict on non-finite steps (launch.nonfinite.Diverged)
        if not isinstance(exc, FloatingPointError) and type(exc).__name__ != "Diverged":
            raise
        status, reason = "fail", one_line(exc)
    step_s = statistics.median(times[1 if len(times) < 4 else 2 :]) if len(times) > 1 else float("nan")
    rec.set(
        losses=[round(v, 5) for v in losses],
        steps_done=len(losses),
        step_ms=round(step_s * 1000, 2),
        img_per_s=round(b / step_s, 1),
        peak_memory_gib=peak_gib(ctx),
    )
    if trainer.scaler.is_enabled():
        rec.set(grad_scale_end=trainer.scaler.get_scale())
    if syncs:
        rec.set(
            host_syncs_per_step=syncs["count"],
            host_syncs=syncs["where"],
            unexpected_syncs=syncs["unexpected"],
            sync_counter=syncs["counter"],
        )
        if syncs["unexpected"] and status == "pass":
            status, reason = "fail", f"unexpected host syncs in a step: {', '.join(syncs['unexpected'])}"
    k = min(5, len(losses) // 2)
    falling = k > 0 and statistics.mean(losses[-k:]) < statistics.mean(losses[:k])
    rec.set(loss_falling=falling)
    if status == "pass" and not falling:
        status, reason = "fail", f"loss did not fall over {len(losses)} steps"
    if losses:
        sync_text = (
            f"{syncs['count']} host syncs/step ({len(syncs['unexpected'])} unexpected)" if syncs else ""
        )
        dtype = str(trainer.amp_dtype or "fp32").removeprefix("torch.")
        rec.summary(
            f"{dtype}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps; "
            f"{step_s * 1000:.0f} ms/step ({b / step_s:.0f} img/s); {sync_text}"
        )
    return status, reason


def check_step_bf16_cl(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    return _step_check(ctx, rec, dl, "bf16", True)


def check_step_bf16(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    return _step_check(ctx, rec, dl, "bf16", False)


def check_step_fp16_cl(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    return _step_check(ctx, rec, dl, "fp16", True)


def check_step_fp16(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    return _step_check(ctx, rec, dl, "fp16", False)
