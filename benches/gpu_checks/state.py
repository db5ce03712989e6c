"""The "checkpoint" check: a save of the full state from device memory, what it costs the training
thread (the stall, the steps that overlap the background write), and a resume into a fresh trainer.

The job check proves save and resume end to end; this one measures the stall, which only it sees."""

from __future__ import annotations

import shutil
import statistics
import time

from gpu_checks.common import Ctx, Deadline, cpu_state, diff_states, fixed_batch, make_trainer, timed
from gpu_checks.record import Rec


def check_checkpoint(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """Trainer.save of the full state from device memory: the stall on the training thread, steps
    overlapping the background write, and Trainer.resume into a fresh trainer, compared bitwise."""
    from launch.checkpoint import TRAIN_FILE

    run = ctx.work / "checkpoint_run"
    shutil.rmtree(run, ignore_errors=True)
    over = {"data__batch_size": ctx.s["ckpt_batch"]}
    trainer = make_trainer(ctx, run, **over)
    batch = fixed_batch(trainer, ctx.s["ckpt_batch"], on_device=False)

    def step() -> None:
        trainer._train_step(trainer.model, batch)
        trainer.step += 1

    for _ in range(1 if ctx.cpu else 3):  # warm-up: cuDNN heuristics, allocator, LARS state
        step()
    base = [timed(ctx, step, 1) for _ in range(2 if ctx.cpu else 5)]
    expected = cpu_state(trainer.state.state_dict())  # what a save writes: models, optimizer, progress
    saved_step = trainer.step
    t = time.perf_counter()
    trainer.save(blocking=False)
    stall = time.perf_counter() - t
    overlap: list[float] = []  # steps while the uploader process writes
    while trainer.checkpointer.busy() and len(overlap) < 200 and dl.left() > 5:
        overlap.append(timed(ctx, step, 1))
    trainer.checkpointer.flush()
    write_s = time.perf_counter() - t
    committed = trainer.checkpointer.last_committed
    size = sum(f.stat().st_size for f in (run / "checkpoints").rglob(TRAIN_FILE))
    base_s = statistics.median(base)
    rec.set(
        committed_step=committed,
        train_pt_mb=round(size / 1e6, 1),
        step_ms=round(base_s * 1000, 2),
        save_stall_ms=round(stall * 1000, 1),
        background_write_s=round(write_s, 2),
        steps_during_write=len(overlap),
        overlap_slowdown_s=round(sum(overlap) - len(overlap) * base_s, 3),
    )
    dl.check("save")
    fresh = make_trainer(ctx, run, **over)
    t = time.perf_counter()
    fresh.resume()
    ctx.sync()
    load_s = time.perf_counter() - t
    diffs = diff_states(expected, cpu_state(fresh.state.state_dict()))
    rec.set(load_s=round(load_s, 2), resumed_step=fresh.step, load_differences=diffs[:5])
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # hundreds of MB on a GPU
    rec.summary(
        f"{size / 1e6:.0f} MB train.pt; training thread stalled {stall * 1000:.0f} ms "
        f"({stall / base_s:.1f} steps); write {write_s:.1f} s in the background over {len(overlap)} steps "
        f"(+{sum(overlap) - len(overlap) * base_s:.2f} s); load {load_s:.1f} s, "
        f"{'bitwise equal' if not diffs else f'{len(diffs)} tensors differ'}"
    )
    if committed != saved_step:
        return "fail", f"checkpoint of step {saved_step} not committed"
    if diffs or fresh.step != saved_step:
        return "fail", f"reloaded state differs: {diffs[0][0] if diffs else 'step'}"
    return "pass", ""
