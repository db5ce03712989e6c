"""Host syncs of one training step: what makes the CPU wait for the GPU instead of queueing ahead.

The trainer's step (``Trainer._train_step``) makes none: the loss stays on the device until
``Trainer._read_step``, which runs at logging steps and before saves only. The one sync a step may
make is GradScaler's overflow read under fp16; anything else is a finding. On a GPU they are seen with
``torch.cuda.set_sync_debug_mode("warn")`` (with their source lines); on a CPU with
``tests.support.host_syncs.HostSyncCounter``, which counts the ops that would sync on a GPU.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gpu_checks.common import REPO

EXPECTED_SYNC_FILES = ("torch/amp/grad_scaler.py",)
"""Where a non-logging step may sync: GradScaler reading its found-inf flag (fp16 only)."""


def expected_sync(filename: str, lineno: int) -> bool:
    """Whether a sync reported at ``filename:lineno`` is one a step is allowed."""
    return filename.replace(os.sep, "/").endswith(EXPECTED_SYNC_FILES)


@contextmanager
def cuda_syncs() -> Iterator[list[tuple[str, int]]]:
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


def where(filename: str, lineno: int) -> str:
    path = Path(filename)
    if path.resolve().is_relative_to(REPO):
        return f"{path.resolve().relative_to(REPO)}:{lineno}"
    parts = path.parts
    rel = Path(*parts[parts.index("torch") :]) if "torch" in parts else Path(path.name)
    return f"{rel}:{lineno}"


def step_syncs(cpu: bool, step: Callable[[], Any]) -> dict[str, Any]:
    """Run ``step`` once under the device's sync counter: the count, where they came from, and the ones
    a step should not make (``unexpected``)."""
    if cpu:
        from tests.support.host_syncs import HostSyncCounter

        with HostSyncCounter() as counter:
            step()
        ops = dict(counter.ops)
        # The counter sees aten ops, not source lines: GradScaler only syncs under fp16, a GPU-only path.
        return {"count": counter.count, "where": ops, "unexpected": sorted(ops), "counter": "HostSyncCounter"}
    with cuda_syncs() as found:
        step()
    return {
        "count": len(found),
        "where": dict(Counter(where(f, ln) for f, ln in found)),
        "unexpected": sorted({where(f, ln) for f, ln in found if not expected_sync(f, ln)}),
        "counter": "cuda sync debug mode",
    }


def step_sync_ops(step: Callable[[], Any]) -> dict[str, int]:
    """On a GPU: the ops ``HostSyncCounter`` sees in ``step`` (device tensors only), to compare its CPU
    verdict with the real thing."""
    from tests.support.host_syncs import HostSyncCounter

    with HostSyncCounter(cpu=False) as counter:
        step()
    return dict(counter.ops)
