"""The per-parameter loop ``pixpro.lars.LARS.step`` ran before it used ``torch._foreach_*``, kept as the
reference the foreach step is tested (bitwise) and benchmarked (``benches/bench_lars.py``) against, and a
counter of the ops a step dispatches (on a GPU, each is a kernel launch)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pixpro.lars import LARS


@torch.no_grad()
def reference_lars_step(optimizer: LARS) -> None:
    """One update of ``optimizer``'s parameters and state by the previous loop: about seven ops per
    parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if group["weight_decay"] != 0:
                g = g.add(p, alpha=group["weight_decay"])
            if group["lars_adapt"]:
                w_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(g)
                ratio = group["trust_coefficient"] * w_norm / (g_norm + group["eps"])
                g = g * torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            state = optimizer.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(g)
            p.add_(buf, alpha=-group["lr"])


class LoopLARS(LARS):
    """``LARS`` with the previous step (same constructor, groups and state layout)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reference_lars_step(self)
        return loss


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active, by overload packet name (``aten.mul``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def aten_ops(self) -> int:
        return sum(n for name, n in self.ops.items() if name.startswith("aten."))
