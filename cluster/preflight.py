"""Login-node side of the preflight: run ``python -m launch.preflight`` in a child process.

The child imports torch, builds the model, runs one step on decoded samples and probes the checkpoint
URL (see :mod:`launch.preflight`); this module never imports torch, so ``pixpro`` stays fast for
everything else. Also: how many GPUs the local executor can give, without torch.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from cluster.errors import Failure, UsageError

if TYPE_CHECKING:
    from schemas import RunSpec

TIMEOUT_S = 120.0
"""A ResNet-50 preflight takes about 13 s on a 2-core login node; a hung file system must not hang submit."""


def run_preflight(spec: RunSpec, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """The child's summary (``loss``, ``seconds``...) or a :class:`UsageError` with its problem lines."""
    payload = json.dumps(spec.model_dump(mode="json"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.preflight", "-"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise Failure(
            f"preflight did not finish within {timeout_s:.0f} s (slow data root or checkpoint store?); "
            "--no-preflight skips it"
        ) from None
    except OSError as exc:
        raise Failure(f"cannot start the preflight: {exc.strerror or exc}") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode == 0 and lines:
        try:
            summary: dict[str, Any] = json.loads(lines[-1])
            return summary
        except ValueError:
            pass
    if proc.returncode == 2 and lines:
        raise UsageError([f"preflight: {line}" for line in lines])
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
    raise Failure(f"preflight crashed (exit {proc.returncode}): {tail[0][:160]}; --no-preflight skips it")


def local_gpus() -> int:
    """CUDA devices a local run can see: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA device
    files (what torch would find, without importing torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for item in visible.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break  # CUDA stops at the first invalid entry
            count += 1
        return count if glob.glob("/dev/nvidia[0-9]*") else 0
    return len(glob.glob("/dev/nvidia[0-9]*"))


def check_local_gpus(gpus: int, visible: int | None = None) -> None:
    """Refuse (exit 2) a local run that asks for more GPUs than this machine shows."""
    have = local_gpus() if visible is None else visible
    if gpus > have:
        raise UsageError(
            f"--gpus {gpus}: this machine has {have} visible CUDA device(s) (--executor local runs here; "
            "--gpus 0 runs on the CPU)"
        )
