"""What the checks share: the parent's decisions, the deadline, run specs and trainers, timing, diffs.

The checks drive the trainer's own pieces (``launch.train.Trainer`` and its builders, ``_train_step``,
``launch.checkpoint``, ``launch.rng``) rather than copies, so what passes is the code users run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from tests.support.trainer import set_nested

REPO = Path(__file__).resolve().parents[2]
NA_CPU = "not applicable on CPU"
GiB = 2**30


class CheckTimeout(Exception):
    """The check's own budget ran out; what it measured so far is kept."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise CheckTimeout(f"budget spent during {what}")


class Ctx:
    """What the parent decided (mode, sizes, data folder, earlier results), as attributes."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.cpu: bool = raw["mode"] == "cpu"
        self.s: dict[str, Any] = raw["sizes"]
        self.data_root = Path(raw["data"])  # the demo dataset (images/ and masks/ below it)
        self.data = self.data_root / "images"
        self.work = Path(raw["work"])
        self.results: dict[str, Any] = raw.get("results", {})
        self.device = torch.device("cpu" if self.cpu else "cuda:0")
        if self.cpu and self.s["threads"]:
            torch.set_num_threads(self.s["threads"])

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def spec_dict(ctx: Ctx, **over: Any) -> dict[str, Any]:
    """A run spec on the generated data at the check's sizes.

    ``cpu_autocast`` (CPU only) puts the CPU on the GPU's bf16 + channels_last path; it is off unless a
    check asks, because on CPUs without AVX512-BF16 or AMX torch's bf16 convolutions are its slow
    reference kernels (5-15x fp32): the other CPU checks run what the trainer runs there by default.
    """
    s = ctx.s
    autocast = bool(over.pop("cpu_autocast", False))
    precision = over.pop("precision", "bf16")
    spec: dict[str, Any] = {
        "name": "gpu-check",
        "seed": 0,
        "data": {
            "root": str(ctx.data),
            "crop_size": s["crop"],
            "crop_scale": [0.2, 1.0],
            "batch_size": s["batch"],
            "num_workers": 0,
        },
        "model": {"backbone": s["backbone"], "projector_hidden": s["hidden"], "projector_out": s["proj_out"]},
        "optim": {
            "base_lr": s["base_lr"],
            "lr_scaling": "sqrt",
            "epochs": 10_000,
            "warmup_epochs": 0,
            "max_steps": 50,
        },
        "precision": precision,
        "channels_last": True,
        "cpu_autocast": ctx.cpu and autocast and precision == "bf16",
        "threads": s["threads"],
        "checkpoint": {"every_steps": None, "every_minutes": None, "keep_last": 2},
        "log_every_steps": 1000,
        "resources": {"time_limit_min": 30},
    }
    return set_nested(spec, **over)


def make_trainer(ctx: Ctx, run_dir: Path, **over: Any) -> Any:
    """The real Trainer, alone (no process group: a world of one)."""
    from launch.preempt import PreemptionFlag
    from launch.train import DistEnv, Trainer
    from schemas import parse_spec

    spec = parse_spec(spec_dict(ctx, **over))
    return Trainer(spec, run_dir, DistEnv(0, 0, 1), PreemptionFlag(()))


def fixed_batch(trainer: Any, n: int, on_device: bool) -> dict[str, torch.Tensor]:
    """``n`` real two-view samples from the trainer's dataset, collated; pinned (as the loader gives
    them on a GPU) or already on the device."""
    from torch.utils.data import default_collate

    ds = trainer.dataset
    batch = default_collate([ds[(0, i % len(ds))] for i in range(n)])
    batch.pop("index")
    if trainer.device.type == "cuda":
        batch = {k: (v.to(trainer.device) if on_device else v.pin_memory()) for k, v in batch.items()}
    return batch


def autocast_for(trainer: Any) -> Any:
    if trainer.amp_dtype is None:
        return nullcontext()
    return torch.autocast(trainer.device.type, dtype=trainer.amp_dtype)


def timed(ctx: Ctx, fn: Callable[[], Any], n: int) -> float:
    """Seconds per call over ``n`` calls, the device drained before and after."""
    ctx.sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    ctx.sync()
    return (time.perf_counter() - t) / n


def peak_gib(ctx: Ctx) -> float | str:
    return round(torch.cuda.max_memory_allocated() / GiB, 2) if not ctx.cpu else NA_CPU


def cpu_state(obj: Any) -> Any:
    """A host copy of a nested state (tensors detached and copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_state(v) for v in obj)
    return obj


def diff_states(a: Any, b: Any, path: str = "state") -> list[tuple[str, float]]:
    """Every leaf that differs, with its max absolute difference (inf for a structural difference)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [(path, math.inf)]
        if torch.equal(a, b):
            return []
        if a.dtype == torch.bool:
            return [(path, 1.0)]
        return [(path, float((a.double() - b.double()).abs().max()))]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(path + ".keys", math.inf)]
        return [d for k in a for d in diff_states(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [(path + ".len", math.inf)]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff_states(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [(path, math.inf)]


def count_leaves(state: Any) -> int:
    if isinstance(state, dict):
        return sum(count_leaves(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(count_leaves(v) for v in state)
    return 1
