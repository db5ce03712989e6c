"""The checks of benches/gpu_check.py; each runs in a child process (``run_child``) under a deadline.

They drive the trainer's own pieces (``launch.train.Trainer`` and its builders, its ``_train_step``,
``launch.checkpoint.Checkpointer``, ``launch.rng``) rather than copies, so what passes here is the code
users run. A check writes its record after every phase, so a check killed for time keeps what it measured.
"""

from __future__ import annotations

import json
import linecache
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
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


class Rec:
    """One check's record; ``save`` after each phase so a kill loses only the phase in flight."""

    def __init__(self, path: Path, name: str, title: str, budget: float) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "name": name,
            "title": title,
            "status": "error",
            "reason": "did not finish",
            "summary": "",
            "numbers": {},
            "seconds": 0.0,
            "budget_s": budget,
        }
        self.numbers: dict[str, Any] = self.data["numbers"]
        self.t0 = time.monotonic()

    def set(self, **numbers: Any) -> None:
        self.numbers.update(numbers)
        self.save()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.save()

    def finish(self, status: str, reason: str = "") -> None:
        self.data["status"], self.data["reason"] = status, reason
        self.save()

    def save(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable))
        tmp.replace(self.path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


# --- context: sizes, specs, trainers ----------------------------------------------------------------
class Ctx:
    """What the parent decided (mode, sizes, data folder, earlier results), as attributes."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.cpu: bool = raw["mode"] == "cpu"
        self.s: dict[str, Any] = raw["sizes"]
        self.data = Path(raw["data"])
        self.work = Path(raw["work"])
        self.results: dict[str, Any] = raw.get("results", {})
        self.device = torch.device("cpu" if self.cpu else "cuda:0")

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()


def spec_dict(ctx: Ctx, **over: Any) -> dict[str, Any]:
    """A run spec on the generated data at the check's sizes; ``over`` uses ``a__b`` for nested keys."""
    s = ctx.s
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
        # On CPU the same settings apply through cpu_autocast (bf16 only): the CPU mode runs the same step.
        "cpu_autocast": ctx.cpu and precision == "bf16",
        "threads": s["threads"],
        "checkpoint": {"every_steps": None, "every_minutes": None, "keep_last": 2},
        "log_every_steps": 1000,
        "resources": {"time_limit_min": 30},
    }
    for dotted, value in over.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return spec


def make_trainer(ctx: Ctx, run_dir: Path, **over: Any) -> Any:
    """The real Trainer (world size from the environment: 1 unless under torchrun)."""
    from launch.preempt import PreemptionFlag
    from launch.train import DistEnv, Trainer
    from schemas import parse_spec

    spec = parse_spec(spec_dict(ctx, **over))
    return Trainer(spec, run_dir, DistEnv.from_environ(), PreemptionFlag(()))


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


def floor_step_fn(trainer: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The same network's own work: both views through the online backbone forward and backward, two
    target forwards (as benches/bench_step.py), in the trainer's precision and memory format."""
    from launch.train import device_views

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


# --- host syncs ------------------------------------------------------------------------------------
# Syncs the trainer means to make in its step: reading the loss (NaN check, progress) and the positive
# count (metrics), and GradScaler's found-inf read in fp16. Anything else in the step is a finding.
_EXPECTED_SYNC_LINES = ("# the step's one host sync",)
"""The trainer's one intended host copy per step (loss and positives together, launch/train.py)."""


def _expected_sync(filename: str, lineno: int) -> bool:
    if filename.replace(os.sep, "/").endswith("torch/amp/grad_scaler.py"):
        return True
    return any(s in linecache.getline(filename, lineno) for s in _EXPECTED_SYNC_LINES)


@contextmanager
def count_syncs() -> Iterator[list[tuple[str, int]]]:
    """CUDA's sync debug mode in "warn", the warnings captured: (file, line) of every host sync."""
    found: list[tuple[str, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)]


def _nccl_version() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a build without CUDA/NCCL
        return None


def _where(filename: str, lineno: int) -> str:
    path = Path(filename)
    if path.resolve().is_relative_to(REPO):
        return f"{path.resolve().relative_to(REPO)}:{lineno}"
    parts = path.parts
    rel = Path(*parts[parts.index("torch") :]) if "torch" in parts else Path(path.name)
    return f"{rel}:{lineno}"


# --- checks ----------------------------------------------------------------------------------------
def check_env(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    import platform

    import torchvision

    n: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }
    if ctx.cpu:
        n.update(
            gpu_name=NA_CPU, gpu_memory_gib=NA_CPU, gpu_count=NA_CPU, capability=NA_CPU, bf16_supported=NA_CPU
        )
        rec.set(**n)
        rec.summary(f"torch {n['torch']}, {n['cpu_count']} cores; no GPU (CPU mode)")
        return "pass", ""
    props = torch.cuda.get_device_properties(0)
    n.update(
        gpu_name=props.name,
        gpu_memory_gib=round(props.total_memory / GiB, 1),
        gpu_count=torch.cuda.device_count(),
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        bf16_supported=torch.cuda.is_bf16_supported(),
    )
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        n["driver"] = (
            subprocess.run(q, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        n["driver"] = None
    rec.set(**n)
    rec.summary(
        f"{n['gpu_name']} {n['gpu_memory_gib']} GiB (sm {n['capability']}), driver {n['driver']}, "
        f"{n['cpu_affinity']} cores"
    )
    return "pass", ""


def check_dist(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """torchrun --nproc-per-node 1 of ``dist_worker`` (NCCL on GPU, gloo on CPU), bounded by the budget."""
    worker_result = ctx.work / "dist_worker.json"
    worker_result.unlink(missing_ok=True)
    ctx_path = ctx.work / "dist_ctx.json"
    ctx_path.write_text(json.dumps(ctx.raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += [str(HERE / "gpu_check.py"), "--dist-worker", str(ctx_path), str(worker_result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(ctx.s["threads"] or 4)}
    t = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(dl.left(), 1)
        )
    except subprocess.TimeoutExpired as exc:
        sys.stdout.write(str(exc.stdout or "") + str(exc.stderr or ""))
        raise CheckTimeout("torchrun child still running at the deadline") from None
    sys.stdout.write(proc.stdout[-20000:] + proc.stderr[-20000:])
    rec.set(torchrun_s=round(time.monotonic() - t, 1), torchrun_exit=proc.returncode)
    if not worker_result.exists():
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        return "error", f"torchrun exit {proc.returncode}, no worker result: {last[0][-300:]}"
    res = json.loads(worker_result.read_text())
    rec.set(**res["numbers"])
    rec.summary(res["summary"])
    if proc.returncode != 0 and res["status"] == "pass":
        return "fail", f"worker passed but torchrun exit {proc.returncode}"
    return res["status"], res["reason"]


def dist_worker(ctx_path: Path, result_path: Path) -> int:
    """Inside torchrun: a process group, collectives, the trainer's model converted to SyncBatchNorm,
    wrapped in DDP as ``Trainer.fit`` does for world size > 1, and trained with the trainer's step."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    ctx = Ctx(json.loads(ctx_path.read_text()))
    n: dict[str, Any] = {}
    out = {"status": "error", "reason": "did not finish", "summary": "", "numbers": n}

    def save() -> None:
        result_path.write_text(json.dumps(out, indent=2, default=_jsonable))

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = "gloo" if ctx.cpu else "nccl"
        device = ctx.device
        if not ctx.cpu:
            torch.cuda.set_device(device)
        t = time.monotonic()
        dist.init_process_group(backend, device_id=None if ctx.cpu else device)
        n.update(backend=backend, world_size=world, init_s=round(time.monotonic() - t, 2))
        x = torch.full((1024,), float(rank + 1), device=device)
        t = time.monotonic()
        dist.all_reduce(x)
        gathered = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(gathered, x)
        dist.broadcast(x, src=0)
        dist.barrier()
        ctx.sync()
        n["collectives_ok"] = bool(torch.all(x == world * (world + 1) / 2).item())
        n["collectives_s"] = round(time.monotonic() - t, 3)
        save()

        trainer = make_trainer(ctx, ctx.work / "dist_run", data__batch_size=ctx.s["dist_batch"])
        model = trainer.model
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model if not ctx.cpu else _cpu_copy(model))
        n["syncbn_layers"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        if not ctx.cpu:
            trainer.model = model = converted
        bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        assert bn.running_mean is not None  # ResNet BN tracks running statistics
        mean0 = bn.running_mean.clone()
        # as Trainer.fit: find_unused_parameters only on CPU/gloo
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if not ctx.cpu else None, find_unused_parameters=ctx.cpu
        )
        batch = fixed_batch(trainer, ctx.s["dist_batch"], on_device=False)
        losses = [trainer._train_step(ddp, batch) for _ in range(ctx.s["dist_steps"])]
        ctx.sync()
        n.update(
            losses=[round(v, 5) for v in losses],
            bn_type=type(bn).__name__,
            bn_stats_moved=bool((bn.running_mean - mean0).abs().max().item() > 0),
        )
        save()
        if ctx.cpu:
            n["syncbn_trained"] = (
                f"{NA_CPU}: SyncBatchNorm needs GPU input (the trainer keeps BatchNorm on gloo)"
            )
            n["syncbn_kernel_max_diff"] = NA_CPU
        else:
            # At world size 1 SyncBatchNorm.forward falls back to F.batch_norm; run its distributed kernel
            # (stats, all_gather over the group, backward all_reduce) directly and compare with F.batch_norm.
            from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

            gen = torch.Generator(device=device).manual_seed(0)
            inp = torch.randn(16, 64, 28, 28, device=device, generator=gen).requires_grad_(True)
            w, b = (
                torch.ones(64, device=device, requires_grad=True),
                torch.zeros(64, device=device, requires_grad=True),
            )
            rm, rv = torch.zeros(64, device=device), torch.ones(64, device=device)
            y = SyncBNFunction.apply(inp, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, world)
            (gi,) = torch.autograd.grad(y.square().sum(), inp)
            ref = F.batch_norm(
                inp, torch.zeros(64, device=device), torch.ones(64, device=device), w, b, True, 0.1, 1e-5
            )
            (gr,) = torch.autograd.grad(ref.square().sum(), inp)
            n["syncbn_kernel_max_diff"] = {
                "forward": float((y - ref).abs().max()),
                "input_grad": float((gi - gr).abs().max()),
            }
            n["syncbn_trained"] = bool(n["bn_type"] == "SyncBatchNorm" and n["bn_stats_moved"])
        dist.barrier()
        dist.destroy_process_group()
        ok = n["collectives_ok"] and all(math.isfinite(v) for v in losses) and n["bn_stats_moved"]
        kernel = n["syncbn_kernel_max_diff"]
        if not ctx.cpu:
            ok = ok and n["syncbn_trained"] is True and max(kernel.values()) < 1e-3
        kernel_text = (
            f"SyncBN kernel vs batch_norm fwd {kernel['forward']:.1e} grad {kernel['input_grad']:.1e}"
            if isinstance(kernel, dict)
            else "SyncBN training n/a on CPU"
        )
        out["summary"] = (
            f"{backend} ws{world}: collectives {'ok' if n['collectives_ok'] else 'WRONG'}; "
            f"{n['syncbn_layers']} SyncBatchNorm layers; DDP losses {', '.join(f'{v:.3f}' for v in losses)}; "
            + kernel_text
        )
        out["status"], out["reason"] = (
            ("pass", "") if ok else ("fail", "see numbers: collectives, losses or BN stats")
        )
    except Exception as exc:
        traceback.print_exc()
        out["status"], out["reason"] = "error", _one_line(exc)
    save()
    return 0 if out["status"] == "pass" else 1


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _step_check(ctx: Ctx, rec: Rec, dl: Deadline, precision: str, channels_last: bool) -> tuple[str, str]:
    """``steps`` trainer steps on one fixed batch: finite, falling loss; host syncs of one step counted."""
    steps = ctx.s["steps"]
    trainer = make_trainer(
        ctx,
        ctx.work / f"step_{precision}_{channels_last}",
        precision=precision,
        channels_last=channels_last,
        optim__max_steps=steps,
    )
    batch = fixed_batch(trainer, ctx.s["batch"], on_device=False)
    rec.set(
        batch=ctx.s["batch"],
        amp_dtype=str(trainer.amp_dtype),
        memory_format=str(trainer.memory_format),
        grad_scaler=trainer.scaler.is_enabled(),
    )
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    times: list[float] = []
    syncs: list[tuple[str, int]] = []
    probe = 3  # count the syncs of a step after the first ones (lazy init, cuDNN heuristics)
    status, reason = "pass", ""
    try:
        for i in range(steps):
            dl.check(f"step {i} of {steps}")
            t = time.perf_counter()
            counting: AbstractContextManager[list[tuple[str, int]]] = (
                count_syncs() if (not ctx.cpu and i == probe) else nullcontext([])
            )
            with counting as found:
                losses.append(trainer._train_step(trainer.model, batch))
            times.append(time.perf_counter() - t)  # the step ends in float(loss): a device sync
            trainer.step += 1
            syncs += found
            if i % 10 == 9:
                rec.set(losses=[round(v, 5) for v in losses])
    except FloatingPointError as exc:
        status, reason = "fail", _one_line(exc)
    except CheckTimeout as exc:
        status, reason = "timeout", f"{exc}; {len(losses)} steps done"
    step_s = statistics.median(times[2:]) if len(times) > 3 else float("nan")
    rec.set(
        losses=[round(v, 5) for v in losses],
        steps_done=len(losses),
        step_ms=round(step_s * 1000, 2),
        img_per_s=round(ctx.s["batch"] / step_s, 1),
        peak_memory_gib=peak_gib(ctx),
    )
    if trainer.scaler.is_enabled():
        rec.set(grad_scale_end=trainer.scaler.get_scale())
    if ctx.cpu:
        rec.set(host_syncs_per_step=NA_CPU, host_syncs=NA_CPU, unexpected_syncs=NA_CPU)
        sync_text = "syncs n/a on CPU"
    else:
        where = Counter(_where(f, ln) for f, ln in syncs)
        unexpected = sorted({_where(f, ln) for f, ln in syncs if not _expected_sync(f, ln)})
        rec.set(host_syncs_per_step=len(syncs), host_syncs=dict(where), unexpected_syncs=unexpected)
        sync_text = f"{len(syncs)} host syncs/step ({len(unexpected)} unexpected)"
        if unexpected and status == "pass":
            status, reason = "fail", f"unexpected host syncs in the step: {', '.join(unexpected)}"
    k = min(5, len(losses) // 2)
    falling = k > 0 and statistics.mean(losses[-k:]) < statistics.mean(losses[:k])
    rec.set(loss_falling=falling)
    if status == "pass" and not falling:
        status, reason = "fail", f"loss did not fall over {len(losses)} steps"
    if losses:
        rec.summary(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps; {step_s * 1000:.0f} ms/step "
            f"({ctx.s['batch'] / step_s:.0f} img/s); {sync_text}"
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


def _interleaved(
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
    """The model's rate (data already on the device) at the recipe's batch, over its floor, peak memory."""
    trainer = make_trainer(ctx, ctx.work / "throughput")
    batch = fixed_batch(trainer, ctx.s["batch"], on_device=True)
    b = ctx.s["batch"]

    def pix() -> None:
        trainer._train_step(trainer.model, batch)

    floor = floor_step_fn(trainer, batch)
    for _ in range(3):  # warm-up: cuDNN heuristics, allocator, LARS state
        pix()
        floor()
    per_round, rounds = (1, 4) if ctx.cpu else (5, 6)
    med = _interleaved(ctx, dl, {"pixpro": pix, "floor": floor}, per_round, rounds)
    n: dict[str, Any] = {
        "batch": b,
        "precision": "bf16",
        "channels_last": True,
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
    n["goal_img_per_s_met"] = n["pixpro_img_per_s"] >= 1500 if not ctx.cpu else NA_CPU
    n["goal_ratio_met"] = n["step_over_floor"] <= 1.10 if not ctx.cpu else NA_CPU
    rec.set(**n)
    rec.summary(
        f"PixPro {n['pixpro_img_per_s']:.0f} img/s (goal 1500), floor {n['floor_img_per_s']:.0f} img/s, "
        f"step/floor {n['step_over_floor']:.3f} (goal 1.10)"
        + (f", peak {n['peak_memory_gib']} GiB" if not ctx.cpu else "")
    )
    if not ctx.cpu and dl.left() > 10:
        # The trainer leaves cudnn.benchmark off; what turning it on would give, same batch.
        torch.backends.cudnn.benchmark = True
        timed(ctx, pix, 3)
        bench = _interleaved(ctx, dl, {"pixpro": pix}, 5, 3)["pixpro"]
        torch.backends.cudnn.benchmark = False
        rec.set(cudnn_benchmark_img_per_s=round(b / bench, 1))
    return "pass", ""


def check_compile(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """torch.compile of the PixPro module inside the trainer's step: speed-up, recompiles after warm-up."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    backend = "aot_eager" if ctx.cpu else "inductor"
    trainer = make_trainer(ctx, ctx.work / "compile")
    batch = fixed_batch(trainer, ctx.s["batch"], on_device=True)
    eager_model = trainer.model

    def eager() -> None:
        trainer._train_step(eager_model, batch)

    timed(ctx, eager, 1 if ctx.cpu else 2)
    rec.set(backend=backend, eager_step_ms_before_compile=round(timed(ctx, eager, 2) * 1000, 2))
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
    med = _interleaved(ctx, dl, {"eager": eager, "compiled": comp}, 1 if ctx.cpu else 5, 3 if ctx.cpu else 5)
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


def check_input(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """The trainer's DataLoader over the demo PNGs with N workers against the model's rate."""
    from launch.train import DistEnv, build_data
    from schemas import parse_spec

    b = ctx.s["batch"]
    spec = parse_spec(spec_dict(ctx))
    dataset, _ = build_data(spec, DistEnv(0, 0, 1))
    th = ctx.results.get("throughput", {}).get("numbers", {})
    model_rate = th.get("pixpro_img_per_s")
    source = "throughput check" if model_rate else "goal (throughput check not run)"
    model_rate = model_rate or 1500.0
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
        rate, pinned = _loader_rate(ctx, spec, dataset, nw)
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
        device_rate = _device_path_rate(ctx, spec, most)
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
    from pixpro.augment import TwoViewTransform
    from pixpro.data import sample_generator

    b, crop = ctx.s["batch"], ctx.s["crop"]
    transform = TwoViewTransform(crop_size=crop, photometric_later=True)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 2 * crop, 2 * crop), generator=g, dtype=torch.uint8)
    image = torch.nn.functional.avg_pool2d(image[None].float(), 5, 1, 2)[0].to(torch.uint8)  # some texture
    crops = [transform(image, sample_generator(0, 0, i)) for i in range(b)]
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


def _device_path_rate(ctx: Ctx, spec: Any, workers: int) -> float:
    """img/s of the loader with ``augment_on: device``, its photometric steps run on the device per batch."""
    from launch.train import DistEnv, build_data

    data = spec.data.model_copy(update={"augment_on": "device", "num_workers": workers})
    spec_d = spec.model_copy(update={"data": data})
    dataset, _ = build_data(spec_d, DistEnv(0, 0, 1))
    return _loader_rate(ctx, spec_d, dataset, workers)[0]


def _loader_rate(ctx: Ctx, spec: Any, dataset: Any, workers: int) -> tuple[float, bool | str]:
    """img/s of the trainer's loader (its settings: pin_memory, reused batch buffers) with ``workers``,
    each batch taken to the device and finished there as the train step does; and whether it came pinned.
    The files repeat so an epoch outlasts the window (page cache: decode + augment, not disk, measured)."""
    from launch.batches import release
    from launch.sampler import ResumableSampler
    from launch.train import Trainer, device_views

    b = ctx.s["batch"]
    repeated = Repeated(dataset, max(1, math.ceil(400 * b / len(dataset))))
    sampler = ResumableSampler(len(repeated), seed=0, rank=0, world_size=1, batch_size=b, drop_last=True)
    spec_n = spec.model_copy(update={"data": spec.data.model_copy(update={"num_workers": workers})})
    holder = SimpleNamespace(dataset=repeated, sampler=sampler, spec=spec_n, device=ctx.device)
    loader = Trainer._loader(cast(Trainer, holder))
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


def _cpu_state(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_state(v) for v in obj)
    return obj


def diff_states(a: Any, b: Any, path: str = "state") -> list[tuple[str, float]]:
    """Every leaf that differs, with its max absolute difference (inf for a structural difference)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [(path, math.inf)]
        if torch.equal(a, b):
            return []
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


def check_checkpoint(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """Trainer.save of the full state from device memory: the stall on the training thread, steps
    overlapping the background write, and Trainer.resume into a fresh trainer, compared bitwise."""
    from launch.checkpoint import TRAIN_FILE

    run = ctx.work / "checkpoint_run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    over = {"data__batch_size": ctx.s["ckpt_batch"]}
    trainer = make_trainer(ctx, run, **over)
    batch = fixed_batch(trainer, ctx.s["ckpt_batch"], on_device=False)

    def step() -> None:
        trainer._train_step(trainer.model, batch)
        trainer.step += 1

    for _ in range(3):
        step()
    base = [timed(ctx, step, 1) for _ in range(3 if ctx.cpu else 5)]
    expected = _cpu_state(trainer.state.state_dict())  # what a save writes: models, optimizer, progress
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
    diffs = diff_states(expected, _cpu_state(fresh.state.state_dict()))
    rec.set(load_s=round(load_s, 2), resumed_step=fresh.step, load_differences=diffs[:5])
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


_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")
_DETERMINISTIC_MAIN = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from launch.train import main; sys.exit(main(sys.argv[1:]))"
)


def _trainer_run(
    ctx: Ctx, spec_path: Path, run: Path, dl: Deadline, stop: int | None = None
) -> tuple[int, str]:
    """``launch.train`` in a child process under deterministic algorithms (warn only: the warnings name
    the ops that have no deterministic kernel); returns exit code and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXPRO_", "SLURM_", "TORCHELASTIC_"))}
    env.update(
        CUBLAS_WORKSPACE_CONFIG=":4096:8", OMP_NUM_THREADS=str(ctx.s["threads"] or 4), PYTHONPATH=str(REPO)
    )
    if stop is not None:
        env["PIXPRO_STOP_AT_STEP"] = str(stop)
    cmd = [sys.executable, "-c", _DETERMINISTIC_MAIN, str(spec_path), "--run-dir", str(run)]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(dl.left(), 1))
    except subprocess.TimeoutExpired:
        raise CheckTimeout(f"trainer run {run.name} still running at the deadline") from None
    sys.stdout.write(f"--- {run.name} stop={stop} exit {p.returncode}\n{p.stderr[-5000:]}\n")
    return p.returncode, p.stderr


def _final(run: Path) -> tuple[int, dict, dict | None]:
    from launch.checkpoint import Checkpointer
    from launch.store import CheckpointStore

    found = Checkpointer(CheckpointStore(str(run / "checkpoints")), 0, 1).load_latest()
    if found is None:
        raise RuntimeError(f"no committed checkpoint in {run}")
    return found


def check_resume(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    """Stop at step k, resume, compare with an uninterrupted run (deterministic algorithms); CUDA RNG."""
    import shutil

    from launch.checkpoint import from_bytes, to_bytes
    from launch.preempt import EXIT_PREEMPTED
    from launch.rng import capture_rng, restore_rng

    s = ctx.s
    # CUDA (and CPU) RNG round trip through the checkpoint's own serialization.
    state = from_bytes(to_bytes(capture_rng()))
    first = torch.randn(1000, device=ctx.device)
    torch.randn(7, device=ctx.device)
    restore_rng(state)
    again = torch.randn(1000, device=ctx.device)
    rec.set(rng_round_trip=bool(torch.equal(first, again)), rng_cuda_states=len(state["cuda"]))

    root = ctx.work / "resume"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spec = spec_dict(
        ctx,
        data__batch_size=s["resume_batch"],
        data__num_workers=s["resume_workers"],
        optim__max_steps=s["resume_steps"],
    )
    spec["threads"] = s["threads"] or None
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    warned: set[str] = set()

    def run(name: str, stop: int | None = None) -> int:
        code, err = _trainer_run(ctx, spec_path, root / name, dl, stop)
        warned.update(m.group(1)[-120:] for m in _NONDETERMINISTIC.finditer(err))
        return code

    code_a = run("a")
    code_b1 = run("b", stop=s["resume_stop"])
    stop_state = _final(root / "b")
    code_b2 = run("b")
    rec.set(exit_codes={"uninterrupted": code_a, "stopped": code_b1, "resumed": code_b2})
    if code_a != 0 or code_b1 != EXIT_PREEMPTED or code_b2 != 0:
        return (
            "error",
            f"trainer exits {code_a}/{code_b1}/{code_b2} (expected 0/{EXIT_PREEMPTED}/0); see logs",
        )
    step_a, train_a, rank_a = _final(root / "a")
    step_b, train_b, rank_b = _final(root / "b")
    saved_cuda = len(stop_state[2]["rng"]["cuda"]) if stop_state[2] else None
    diffs = diff_states({"train": train_a, "rng": rank_a}, {"train": train_b, "rng": rank_b})
    worst = sorted(diffs, key=lambda d: -d[1])[:5]
    rec.set(
        stopped_at=stop_state[0],
        final_steps=[step_a, step_b],
        saved_cuda_rng_states=saved_cuda,
        bitwise=not diffs,
        differing_tensors=len(diffs),
        max_differences=worst,
        nondeterministic_ops=sorted(warned),
    )
    verdict = "bitwise identical"
    if diffs:
        dl.check("repeat run")
        run("c")
        _, train_c, rank_c = _final(root / "c")
        run_to_run = diff_states({"train": train_a, "rng": rank_a}, {"train": train_c, "rng": rank_c})
        rec.set(
            run_to_run_differing_tensors=len(run_to_run),
            run_to_run_max=max((d[1] for d in run_to_run), default=0.0),
        )
        cause = "run-to-run nondeterminism" if run_to_run else "the resume itself"
        verdict = f"{len(diffs)} tensors differ (max {worst[0][1]:.2e} at {worst[0][0]}); cause: {cause}"
    rec.summary(
        f"stop at {stop_state[0]}, resume to {step_b}: {verdict}; RNG round trip "
        f"{'ok' if rec.numbers['rng_round_trip'] else 'BROKEN'} ({len(state['cuda'])} CUDA states); "
        f"{len(warned)} nondeterministic-op warnings"
    )
    if not rec.numbers["rng_round_trip"]:
        return "fail", "RNG state did not round-trip"
    if not ctx.cpu and saved_cuda != torch.cuda.device_count():
        return "fail", f"checkpoint holds {saved_cuda} CUDA RNG states, {torch.cuda.device_count()} devices"
    if diffs:
        ops = f"; ops without a deterministic kernel: {', '.join(sorted(warned))[:300]}" if warned else ""
        return "fail", verdict + ops
    return "pass", ""


CHECK_FUNCS: dict[str, Callable[[Ctx, Rec, Deadline], tuple[str, str]]] = {
    "env": check_env,
    "dist": check_dist,
    "step_bf16_cl": check_step_bf16_cl,
    "step_fp16_cl": check_step_fp16_cl,
    "step_bf16": check_step_bf16,
    "step_fp16": check_step_fp16,
    "throughput": check_throughput,
    "input": check_input,
    "photometric": check_photometric,
    "checkpoint": check_checkpoint,
    "resume": check_resume,
    "compile": check_compile,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def run_child(name: str, ctx_path: Path, result_path: Path, budget: float) -> int:
    """One check in this process: a deadline a little inside the parent's kill, the record always written."""
    from gpu_check import BY_NAME

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = Ctx(json.loads(ctx_path.read_text()))
    rec = Rec(result_path, name, BY_NAME[name].title, budget)
    rec.save()
    if ctx.cpu and ctx.s["threads"]:
        torch.set_num_threads(ctx.s["threads"])
    try:
        status, reason = CHECK_FUNCS[name](ctx, rec, Deadline(budget))
    except CheckTimeout as exc:
        status, reason = "timeout", str(exc)
    except Exception as exc:
        traceback.print_exc()
        status, reason = "error", _one_line(exc)
    rec.finish(status, reason)
    return 0
