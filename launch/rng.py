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
    """Snapshot python ``random``, numpy's global RNG, torch CPU and this process's CUDA device.

    The result contains only tensors, ints, floats, ``None``, lists and dicts, so it survives
    ``torch.save`` / ``torch.load(weights_only=True)``. It is per process (each rank saves its own), and
    holds one CUDA state, the device this process trains on (``torch.cuda.set_device``), not every
    visible one: a resume may place the same rank on another node or another local GPU (8 GPUs on one
    node, then 4 + 4 on two), and the rank's stream follows the rank.
    """
    cuda = [torch.cuda.get_rng_state().cpu()] if torch.cuda.is_available() else []
    return {
        "python": _capture_python(),
        "numpy": _capture_numpy(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(state: dict[str, Any], *, strict: bool = True) -> None:
    """Put every generator back where :func:`capture_rng` found it; the CUDA state goes to this
    process's current device, whichever index that is.

    With ``strict``, a CUDA state without CUDA here (or CUDA here and none saved) raises ``ValueError``:
    some stream would silently continue from an unrelated state. ``strict=False`` restores the rest.
    A state listing several devices (as once saved: every visible one) gives the current device's entry.
    """
    cuda_states = list(state.get("cuda", []))
    has_cuda = torch.cuda.is_available()
    if strict and bool(cuda_states) != has_cuda:
        raise ValueError(
            f"RNG state has {len(cuda_states)} CUDA device state(s) but this process "
            f"{'trains on a CUDA device' if has_cuda else 'has no CUDA device'}; pass strict=False to "
            "restore the other generators only"
        )
    _restore_python(state["python"])
    _restore_numpy(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if has_cuda and cuda_states:
        current = torch.cuda.current_device()
        index = 0 if len(cuda_states) == 1 else current
        if index < len(cuda_states):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), current)
        elif strict:
            raise ValueError(f"RNG state has no entry for CUDA device {current} ({len(cuda_states)} saved)")
