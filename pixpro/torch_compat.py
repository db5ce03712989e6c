"""The three torch APIs pixpro uses that torch 2.11 lacks, each with its 2.11 equivalent.

pixpro pins torch 2.14.1. The lent GPU machines that run the acceptance check (``make gpu-check``)
hold torch 2.11 in their image and cannot download another: these keep the CUDA path runnable there,
with the same semantics, and cost nothing on 2.14.1 (tests/test_torch_compat.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

HAS_ALL_GATHER_SINGLE = hasattr(dist, "all_gather_single")
"""torch 2.14 names ``all_gather_into_tensor`` (deprecated there) ``all_gather_single``."""
HAS_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
"""torch 2.13 replaced DDP's ``broadcast_buffers``; ``False`` of either skips the broadcast before each
forward. They differ only at construction, where ``broadcast_buffers=False`` also leaves the buffers
out of the initial sync: pixpro's are equal on every rank there (the same seed builds every model)."""
HAS_BATCHNORM_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters
"""torch 2.14's batch norms may have no bias (``bias=False``); before, an affine one always had one."""


def all_gather_single(output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's ``input`` into ``output`` (concatenated or stacked along dim 0), in rank order."""
    if HAS_ALL_GATHER_SINGLE:
        dist.all_gather_single(output, input, group=group)
    else:
        dist.all_gather_into_tensor(output, input, group=group)


def no_forward_buffer_sync() -> dict[str, Any]:
    """DDP's keyword that skips the broadcast of buffers before each forward."""
    return {"forward_sync_buffers": False} if HAS_FORWARD_SYNC_BUFFERS else {"broadcast_buffers": False}


def batchnorm_bias(bias: bool) -> dict[str, Any]:
    """The keyword of a batch norm with or without a bias: none where torch has no such choice (a bias
    is then always there, and a module without one cannot exist to be copied)."""
    if HAS_BATCHNORM_BIAS:
        return {"bias": bias}
    if not bias:
        raise ValueError("this torch has no batch norm without a bias (torch 2.14 added bias=False)")
    return {}
