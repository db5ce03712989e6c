"""Synchronized BatchNorm that runs on gloo (CPU) as well as NCCL (CUDA) and never syncs the host.

Why not ``torch.nn.SyncBatchNorm``:

- it refuses CPU input, so a multi-rank CPU run (the tests, the demo) would train with per-rank
  BatchNorm while the GPU job trains with synchronized statistics; this one runs the same algorithm
  on both, so the CPU tests train with the GPU job's BN;
- its autograd function drops the statistics of empty ranks with a boolean mask (``count_all[mask]``):
  a device->host sync in every BN layer of every forward (about 216 in a ResNet-50 PixPro step), and
  with ``momentum=None`` it reads ``num_batches_tracked`` with ``.item()``. The training sampler drops
  the last partial batch, so every rank always has samples and nothing needs filtering.

One training forward is: per-rank mean and variance, ONE all-gather of a packed
``[mean, var-or-invstd, count]`` row per rank (the count travels as a float in the same tensor),
a combination in rank order (deterministic, the same bits on every rank, so the running statistics
stay equal on every rank without DDP's buffer broadcast), then the normalization. One backward is:
per-rank ``sum(dy)`` and ``sum(dy * (x - mean))``, ONE all-reduce of both packed together, then the
input gradient from the global sums; weight and bias gradients stay local (DDP averages them).

On CUDA it calls torch's own SyncBN kernels (``torch.batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``, ``batch_norm_backward_reduce``,
``batch_norm_backward_elemt``: the same kernels as ``torch.nn.SyncBatchNorm``, so no slowdown). torch
2.14 has no CPU kernel for any of them, so on the CPU the per-rank statistics and sums come from
torch's CPU batch-norm kernels (``batch_norm_update_stats``, ``native_batch_norm_backward``), the ranks'
statistics are combined with plain tensor ops (Chan's parallel combination of per-rank mean and M2),
the output is eval-mode ``torch.batch_norm`` with the global statistics, and the input gradient a few
elementwise ops. Statistics are float32 (float64 for float64 input) whatever the input's dtype; the
output and input gradient have the input's dtype and memory format, as torch's SyncBN does under
autocast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from pixpro.torch_compat import all_gather_single, batchnorm_bias

__all__ = ["FUSED_DEVICE_TYPES", "SyncBatchNorm", "convert_sync_batchnorm"]

FUSED_DEVICE_TYPES: set[str] = {"cuda"}
"""Device types whose tensors go through torch's fused SyncBN kernels; the rest take the CPU path."""

_CHANNELS_LAST = (torch.channels_last, torch.channels_last_3d)


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in, so an output made like it can be laid out the same way."""
    if not x.is_contiguous():
        for fmt in _CHANNELS_LAST:
            if x.dim() == (4 if fmt is torch.channels_last else 5) and x.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


def _channel_view(x: Tensor) -> list[int]:
    """The shape that broadcasts a per-channel vector against ``x`` (``[1, C, 1, ...]``)."""
    return [1, x.size(1)] + [1] * (x.dim() - 2)


def _all_gather_rows(row: Tensor, group: dist.ProcessGroup | None, world_size: int) -> Tensor:
    """``[world_size, len(row)]``: every rank's ``row`` in rank order, in one collective.

    ``all_gather_single`` into a flat tensor works on NCCL and gloo alike (gloo refuses the
    ``[1, world * len]`` shape torch's SyncBN uses on NCCL).
    """
    out = row.new_empty(world_size * row.numel())
    all_gather_single(out, row, group=group)
    return out.view(world_size, row.numel())


def _combine(mean_all: Tensor, var_all: Tensor, count_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s combination of per-rank ``[W, C]`` means and biased variances, counts ``[W, 1]``.

    Returns the global mean ``[C]``, the global M2 (sum of squared deviations) ``[C]`` and the total
    count ``[1]``; the sums run over the ranks in rank order, so every rank gets the same bits.
    """
    total = count_all.sum(0)
    mean = (mean_all * count_all).sum(0) / total
    m2 = (var_all * count_all).sum(0) + ((mean_all - mean).square() * count_all).sum(0)
    return mean, m2, total


def _update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, m2: Tensor, total: Tensor, factor: float | Tensor
) -> None:
    """``running = (1 - factor) * running + factor * batch`` with the unbiased variance, as BatchNorm does.

    ``factor`` is the momentum, or ``1 / num_batches_tracked`` as a device tensor for the cumulative
    average (``momentum=None``), so no value is read on the host.
    """
    unbiased = m2 / (total - 1)
    running_mean.copy_(running_mean.to(mean.dtype) * (1 - factor) + mean * factor)
    running_var.copy_(running_var.to(mean.dtype) * (1 - factor) + unbiased * factor)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized batch norm: one all-gather forward, one all-reduce backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        factor: float | Tensor,
        group: dist.ProcessGroup | None,
        world_size: int,
    ) -> Tensor:
        out_format = _memory_format(x)
        channels = x.size(1)
        count = x.numel() // channels
        ctx.fused = x.device.type in FUSED_DEVICE_TYPES
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        if ctx.fused:
            if out_format not in _CHANNELS_LAST:
                x = x.contiguous()
            mean, invstd = torch.batch_norm_stats(x, eps)
            row = torch.cat([mean, invstd, mean.new_full((1,), count)])
            mean_all, invstd_all, count_all = _all_gather_rows(row, group, world_size).split(
                [channels, channels, 1], dim=1
            )
            counts = count_all.reshape(-1)
            if (
                running_mean is not None
                and running_var is not None
                and isinstance(factor, float)
                and running_mean.dtype in (torch.float32, torch.float64)
            ):
                # The kernel reads the counts in the running statistics' dtype.
                mean, invstd = torch.batch_norm_gather_stats_with_counts(
                    x, mean_all, invstd_all, running_mean, running_var, factor, eps,
                    counts.to(running_mean.dtype),
                )  # fmt: skip
            else:
                # A device-tensor momentum (cumulative average), no running statistics, or low-precision
                # ones (the kernel would read the counts in fp16): the same combination in plain ops.
                mean, m2, total = _combine(mean_all, invstd_all.pow(-2) - eps, count_all)
                invstd = torch.rsqrt(m2 / total + eps)
                if running_mean is not None and running_var is not None:
                    _update_running(running_mean, running_var, mean, m2, total, factor)
            out = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
            ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
            return out

        # torch's CPU batch-norm kernels: per-channel mean and biased variance (in float32 for
        # bf16/fp16 input: scratch float32 running buffers make the kernel run in mixed precision,
        # momentum 0 leaves them be), then y = (x - mean) * invstd * weight + bias with the global
        # statistics, in the input's dtype and memory format.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        scratch = None if x.dtype == acc else torch.zeros(2, channels, dtype=acc, device=x.device)
        mean, var = torch.batch_norm_update_stats(
            x, None if scratch is None else scratch[0], None if scratch is None else scratch[1], 0.0
        )
        row = torch.cat([mean, var, mean.new_full((1,), count)])
        mean_all, var_all, count_all = _all_gather_rows(row, group, world_size).split(
            [channels, channels, 1], dim=1
        )
        mean, m2, total = _combine(mean_all, var_all, count_all)
        var = m2 / total
        if running_mean is not None and running_var is not None:
            _update_running(running_mean, running_var, mean, m2, total, factor)
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps), total)
        return out.contiguous(memory_format=out_format)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        channels = x.size(1)
        if ctx.fused:
            if _memory_format(grad_out) not in _CHANNELS_LAST:
                grad_out = grad_out.contiguous()
            sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
                grad_out, x, mean, invstd, weight, need_x, need_w, need_b
            )
            if need_x:
                summed = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(summed, dist.ReduceOp.SUM, group=ctx.group)
                sum_dy, sum_dy_xmu = summed.split(channels)
                if weight is not None and weight.dtype != mean.dtype:
                    weight = weight.to(mean.dtype)
                grad_x = torch.batch_norm_backward_elemt(
                    grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
                )
        else:
            # Local sums from torch's CPU backward kernel (float32 for bf16/fp16 input):
            # grad_bias = sum(dy), grad_weight = sum(dy * (x - mean)) * invstd.
            _, sum_dy_xmu_invstd, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, None, None, None, mean, invstd, True, 0.0, [False, True, True]
            )
            if need_w:
                grad_w = sum_dy_xmu_invstd.to(weight.dtype)
            if need_b:
                grad_b = sum_dy.to(ctx.bias_dtype)
            if need_x:
                summed = torch.cat([sum_dy, sum_dy_xmu_invstd])
                dist.all_reduce(summed, dist.ReduceOp.SUM, group=ctx.group)
                sum_dy, sum_dy_xmu_invstd = summed.split(channels)
                # grad_x = scale * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n), in the
                # accumulate dtype on tensors of one dtype and layout (mixed-dtype broadcasting ops are
                # ten times slower on the CPU).
                acc = mean.dtype
                fmt = _memory_format(x)
                shape = _channel_view(x)
                scale = invstd if weight is None else invstd * weight.to(acc)
                xmu_coef = -scale * invstd * sum_dy_xmu_invstd / count
                offset = -scale * sum_dy / count
                grad = x.to(dtype=acc, memory_format=fmt)
                grad = grad - mean.view(shape) if grad is x else grad.sub_(mean.view(shape))
                grad.mul_(xmu_coef.view(shape))
                grad.addcmul_(grad_out.to(dtype=acc, memory_format=fmt), scale.view(shape))
                grad_x = grad.add_(offset.view(shape)).to(x.dtype)
        if weight is None or not need_w:
            grad_w = None
        if not need_b:
            grad_b = None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole batch of every rank of ``process_group`` (None: the default group).

    A drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU tensors over gloo and never
    synchronizes the host with the device (see the module docstring); its parameters and buffers are
    exactly ``nn.BatchNorm2d``'s, so checkpoints load into either. In eval mode, or without an
    initialized process group of more than one rank, it is ``nn.BatchNorm{1,2,3}d`` (with BatchNorm's
    own ``float(num_batches_tracked)`` for ``momentum=None``). Every rank must give it a non-empty
    batch: there is no filtering of empty ranks (the training sampler drops the last partial batch).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **batchnorm_bias(bias)
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or (world_size := self._world_size()) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        running_mean = running_var = None
        factor: float | Tensor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None: the cumulative average, 1/n as a device tensor (torch reads n with .item())
            factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean, self.running_var
        out: Tensor = _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            self.process_group,
            world_size,
        )
        return out


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Swap every ``_BatchNorm`` (BatchNorm1d/2d/3d, torch's SyncBatchNorm, ours) for ours.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: children are replaced in place and
    ``module`` is returned, or the new layer when ``module`` itself is a batch norm. The new layers
    take over the very parameter and buffer tensors (values, ``requires_grad``, device, dtype; an
    optimizer built before still points at them) and the training mode, so the state dict is unchanged.
    """
    converted = module
    if isinstance(module, _BatchNorm):
        has_bias = module.bias is not None if module.affine else True
        # Built on the meta device: every tensor is replaced by the original's right below.
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device="meta",
            bias=has_bias,
        )
        for name in ("weight", "bias"):
            setattr(converted, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            setattr(converted, "qconfig", module.qconfig)  # noqa: B010 (nn.Module types its setattr)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
