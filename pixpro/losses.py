"""PixPro's pixel consistency loss, the optional instance (BYOL) loss and the PixContrast loss.

All losses compute in float32 so that mixed precision only affects the networks, and all stay finite
(with finite gradients) when an image or the whole batch has no positive pair, which happens for about
2% of random view pairs. Float32 inputs are not enough: under ``torch.autocast`` ``bmm`` runs in the
low-precision dtype whatever its inputs (cosines to ~3 digits in bf16), so each loss runs with autocast
off (:func:`_float32`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import torch

_P = ParamSpec("_P")


def _float32(loss: Callable[_P, torch.Tensor]) -> Callable[_P, torch.Tensor]:
    """Run ``loss`` with autocast disabled on its tensors' device (inputs are upcast inside)."""

    @functools.wraps(loss)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> torch.Tensor:
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return loss(*args, **kwargs)

    return run


def _cells(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` or ``[B, C, n]`` -> ``[B, C, n]`` in float32."""
    return x.flatten(2).float()


@_float32
def consistency_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One direction of the pixel loss: ``-2 mean_b[sum(cos * mask) / (sum(mask) + 1e-6)]``.

    ``pred`` ``[B, C, n1]`` (or ``[B, C, h, w]``) and ``target`` ``[B, C, n2]`` are L2-normalized over
    channels; ``mask`` ``[B, n1, n2]`` marks positive pairs. An image without positives adds 0.
    """
    cos = torch.bmm(_cells(pred).transpose(1, 2), _cells(target))  # [B, n1, n2]
    mask = mask.float()
    per_image = (cos * mask).sum((1, 2)) / (mask.sum((1, 2)) + 1e-6)
    return -2 * per_image.mean()


@_float32
def instance_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression ``-2 mean cos(p, z)`` between normalized ``[B, D]`` prediction and target."""
    return -2 * (p.float() * z.float()).sum(1).mean()


@_float32
def pixcontrast_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.3,
    valid_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """PixContrast (paper eq. 1): InfoNCE over pixels with all positives in the numerator.

    For each pixel i of view 1 with at least one positive, ``-log(sum_{j pos} e^{s_ij/tau} /
    sum_{j valid} e^{s_ij/tau})`` where ``s`` is the cosine to the other view's pixels and the
    denominator runs over all of the other view's valid pixels (positives and negatives); averaged over
    such pixels across the batch, 0 if there are none. ``q`` ``[B, C, n1]``, ``k`` ``[B, C, n2]``
    normalized; ``mask`` ``[B, n1, n2]``; ``valid_k`` ``[B, n2]`` bool (default: all valid).
    """
    logits = torch.bmm(_cells(q).transpose(1, 2), _cells(k)) / tau  # [B, n1, n2]
    valid = torch.ones_like(logits, dtype=torch.bool) if valid_k is None else valid_k.bool()[:, None, :]
    valid = valid.expand_as(logits)
    positive = (mask > 0) & valid
    has_positive = positive.any(-1)  # [B, n1]

    # Rows without a positive are replaced by zeros before the logsumexp: an all -inf row would give
    # NaN gradients that a later multiplication by 0 cannot undo.
    rows = has_positive[..., None]
    neg_inf = torch.finfo(logits.dtype).min
    log_num = torch.where(rows, logits.masked_fill(~positive, neg_inf), 0.0).logsumexp(-1)
    log_den = torch.where(rows, logits.masked_fill(~valid, neg_inf), 0.0).logsumexp(-1)
    per_pixel = (log_den - log_num) * has_positive
    return per_pixel.sum() / has_positive.sum().clamp_min(1)
