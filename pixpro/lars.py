"""LARS over SGD with momentum, as PixPro's official recipe trains with.

Layer-wise adaptation rescales each weight's step to ``trust * ||w||``, which keeps large-batch training
stable; BN parameters and biases are excluded from both weight decay and adaptation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; per group ``weight_decay`` and ``lars_adapt``.

    Per parameter: ``g <- g + wd * w``; if adapted and both norms are positive,
    ``g <- g * trust * ||w|| / (||g|| + eps)``; ``buf <- momentum * buf + g``; ``w <- w - lr * buf``.
    The buffer lives in ``state[p]["momentum_buffer"]`` so ``state_dict()`` resumes exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        lars_adapt: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_adapt=lars_adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
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
                    # torch.where instead of a Python branch: no device sync per parameter.
                    g = g * torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights (ndim >= 2) get decay and adaptation; 1-D parameters get neither.

    Deciding by ``ndim`` rather than module type keeps BN gamma/beta and biases excluded after
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` or any other module swap. Frozen parameters (the
    EMA target) are left out.
    """
    weights: list[torch.nn.Parameter] = []
    flat: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (weights if p.ndim >= 2 else flat).append(p)
    return [
        {"params": weights, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": flat, "weight_decay": 0.0, "lars_adapt": False},
    ]
