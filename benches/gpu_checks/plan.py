"""Which checks run, under which budgets, at which sizes. Torch-free: the parent reads it before torch.

A check's budget is the moment the runner kills it (its own deadline is :data:`GRACE_S` earlier, so it
stops and writes its record first). The budgets of a mode plus its set-up reserve add up to at most that
mode's total (checked on import), so a run where every check uses its whole budget still ends in time.
On a GPU the total is 7.5 minutes: short enough that a rerun of a failed check (``--only``) fits in the
same GPU loan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

TOTAL_S = {"gpu": 450.0, "cpu": 540.0}
"""The default ``--total-s`` of each mode: the whole run, set-up included. The CPU budgets are about
three times what the checks take on an idle 2-core machine: CI machines are shared, and a budget only
bounds a hung check; the total stays inside pytest's 600 s timeout (tests/test_gpu_check.py)."""
SETUP_S = {"gpu": 30.0, "cpu": 25.0}
"""Reserved before the first check: the demo data and the worker kernels' compile cache."""
GRACE_S = 5.0
"""A check's own deadline comes this long before the runner kills it: time to write its record."""
MIN_BUDGET_S = 5.0
"""A check left with less than this is recorded as not started rather than started to be killed."""
GOALS = {"img_per_s_per_gpu": 1500, "step_over_floor": 1.10}
"""The throughput goals on a GPU: the recipe's rate per GPU, and the PixPro step over its network's floor."""


@dataclass(frozen=True)
class CheckDef:
    """One check: its entry (``module:function`` under ``gpu_checks``), its GPU and CPU budgets (s),
    and the reason it does not apply on CPU, if it does not."""

    name: str
    title: str
    entry: str
    gpu_s: float
    cpu_s: float
    gpu_only: str = ""

    def budget(self, mode: str) -> float:
        return self.gpu_s if mode == "gpu" else self.cpu_s


_FP16 = "not applicable on CPU: fp16 autocast with GradScaler needs a GPU"

CHECKS: tuple[CheckDef, ...] = (
    CheckDef("env", "environment", "env:check_env", 10, 20),
    CheckDef(
        "syncbn",
        "process groups of one + SyncBatchNorm bf16/channels_last vs fp32",
        "syncbn:check_syncbn",
        25,
        30,
    ),
    CheckDef(
        "job",
        "the real job (launch.run): uninterrupted vs stopped + resumed",
        "job:check_job",
        100,
        170,
    ),
    CheckDef("step_bf16_cl", "PixPro steps bf16, channels_last", "steps:check_step_bf16_cl", 25, 45),
    CheckDef(
        "step_fp16_cl",
        "PixPro steps fp16 + GradScaler, channels_last",
        "steps:check_step_fp16_cl",
        25,
        0,
        _FP16,
    ),
    CheckDef("step_bf16", "PixPro steps bf16, contiguous", "steps:check_step_bf16", 20, 30),
    CheckDef(
        "step_fp16", "PixPro steps fp16 + GradScaler, contiguous", "steps:check_step_fp16", 20, 0, _FP16
    ),
    CheckDef("throughput", "throughput: PixPro step vs floor, peak memory", "perf:check_throughput", 30, 40),
    CheckDef("input", "input pipeline: workers per GPU", "data:check_input", 35, 30),
    CheckDef(
        "photometric",
        "photometric steps on the device: same views, cost per batch",
        "data:check_photometric",
        15,
        25,
    ),
    CheckDef("checkpoint", "checkpoint save/load from device memory", "state:check_checkpoint", 25, 40),
    CheckDef("compile", "torch.compile: speed-up and recompiles", "perf:check_compile", 90, 70),
)
BY_NAME = {c.name: c for c in CHECKS}


def budget_problems() -> list[str]:
    """Each mode whose check budgets and set-up reserve do not fit its total."""
    problems = []
    for mode, total in TOTAL_S.items():
        spent = SETUP_S[mode] + sum(c.budget(mode) for c in CHECKS)
        if spent > total:
            problems.append(f"{mode}: set-up {SETUP_S[mode]:.0f} s + checks exceed the total {total:.0f} s")
    problems += [
        f"{c.name}: {m} budget under {MIN_BUDGET_S} s"
        for c in CHECKS
        for m in TOTAL_S
        if 0 < c.budget(m) < MIN_BUDGET_S
    ]
    return problems


if budget_problems():  # a budget edit that breaks the rule fails at once, not on the next GPU loan
    raise AssertionError("; ".join(budget_problems()))


def sizes(cpu: bool, quick: bool) -> dict[str, Any]:
    """The sizes each check uses: the ImageNet recipe's model and per-GPU batch on a GPU, toys on CPU."""
    if cpu:
        s: dict[str, Any] = {
            "backbone": "squeezenet1_1",  # the end-to-end tests' backbone: a smoke test of the script
            "crop": 64,
            "batch": 4,
            "hidden": 64,
            "proj_out": 32,
            "base_lr": 1.0,
            "steps": 5,
            "step_batch": 2,
            "images": 48,
            "image_size": 80,
            "syncbn_shape": [8, 16, 12, 12],
            "ckpt_batch": 4,
            "job_ranks": 2,  # gloo; on a GPU: every visible GPU
            "job_batch": 2,
            "job_steps": 5,
            "job_stop": 3,
            "job_every": 2,
            "job_workers": 0,
            "workers": [0, 2],
            "window_s": 1.0,
            "threads": 1,  # one thread: OpenMP barriers crawl on a shared, oversubscribed CI machine
        }
    else:
        from schemas import load_spec

        recipe = load_spec(REPO / "launch" / "specs" / "imagenet_r50_100ep.json")
        s = {
            "backbone": recipe.model.backbone,
            "crop": recipe.data.crop_size,
            "batch": recipe.data.batch_size,
            "hidden": recipe.model.projector_hidden,
            "proj_out": recipe.model.projector_out,
            "base_lr": recipe.optim.base_lr,
            "steps": 20,
            "step_batch": recipe.data.batch_size,
            "images": 256,
            "image_size": 256,
            "syncbn_shape": [32, 256, 56, 56],
            "ckpt_batch": 32,
            "job_ranks": None,
            "job_batch": 64,  # per GPU; fewer when the GPUs' global batch would exceed half the images
            "job_steps": 6,
            "job_stop": 3,
            "job_every": 2,
            "job_workers": 4,
            "workers": [1, 2, 4, 8, 12],
            "window_s": 3.0,
            "threads": None,
        }
    if quick:
        s["steps"] = max(5, s["steps"] // 2)
        s["workers"] = s["workers"][::2]
        s["window_s"] /= 2
    return s
