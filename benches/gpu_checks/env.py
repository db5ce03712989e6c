"""The "env" check: what the run ran on (torch, CUDA, cuDNN, NCCL, driver, GPU, cores)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch

from gpu_checks.common import NA_CPU, Ctx, Deadline, GiB
from gpu_checks.record import Rec


def nccl_version() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a build without CUDA/NCCL
        return None


def check_env(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    import torchvision

    n: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl_version(),
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
        f"{n['gpu_count']} GPU(s), {n['cpu_affinity']} cores"
    )
    return "pass", ""
