"""Capture and restore every global RNG of one process, in a ``weights_only``-loadable form.

Checkpoints are loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling), which
rejects numpy arrays and numpy scalars; so Python's and numpy's states are converted to tensors
and plain ints/floats here and converted back on restore.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]

_NUMPY_ALGORITHM = "MT19937"


def _capture_python() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        # Mersenne Twister words are < 2**32 and the position is <= 624: int64 holds them exactly.
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": None if gauss_next is None else float(gauss_next),
    }


def _restore_python(state: dict[str, Any]) -> None:
    internal = tuple(int(x) for x in state["state"].tolist())
    random.setstate((int(state["version"]), internal, state["gauss_next"]))


def _capture_numpy() -> dict[str, Any]:
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if algorithm != _NUMPY_ALGORITHM:
        raise ValueError(f"unsupported numpy global bit generator {algorithm!r}")
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _restore_numpy(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            _NUMPY_ALGORITHM,
            keys,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def capture_rng() -> dict[str, Any]:
    """Snapshot python ``random``, numpy's global RNG, torch CPU and every visible CUDA device.

    The result contains only tensors, ints, floats, ``None``, lists and dicts, so it survives
    ``torch.save`` / ``torch.load(weights_only=True)``. It is per process: in DDP each rank
    captures its own and the trainer gathers them.
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "python": _capture_python(),
        "numpy": _capture_numpy(),
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in cuda],
    }


def restore_rng(state: dict[str, Any], *, strict: bool = True) -> None:
    """Put every generator back where :func:`capture_rng` found it.

    With ``strict`` a different number of CUDA devices (including a CPU-only capture restored
    on a GPU machine and vice versa) raises ``ValueError``, because some stream would silently
    continue from an unrelated state; ``strict=False`` restores the devices both sides have.
    """
    cuda_states = list(state.get("cuda", []))
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if strict and len(cuda_states) != n_devices:
        raise ValueError(
            f"RNG state has {len(cuda_states)} CUDA device state(s) but this process sees "
            f"{n_devices}; pass strict=False to restore only the common devices"
        )
    _restore_python(state["python"])
    _restore_numpy(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    for device, device_state in enumerate(cuda_states[:n_devices]):
        torch.cuda.set_rng_state(device_state.cpu(), device)
