"""The "syncbn" check: the trainer's process groups at world size 1, and its SyncBatchNorm's distributed
path under bf16 autocast + channels_last against an fp32 reference.

The groups are built by ``launch.collectives.Collectives.start`` in this process (``env://`` on a local
port, world size 1): on a GPU the default group is ``cpu:gloo,cuda:nccl`` bound to the device, plus the
gloo control group; every control-plane operation and a data-plane collective run on them. At world size 1
``pixpro.sync_batchnorm.SyncBatchNorm`` falls back to plain BatchNorm, so its autograd Function is called
directly with the group of one: the statistics all-gather, the backward all-reduce and, on CUDA, torch's
fused SyncBN kernels all run, on the bf16 channels_last activations a convolution under autocast gives.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpu_checks.common import Ctx, Deadline, timed
from gpu_checks.record import Rec
from gpu_checks.syncs import step_syncs
from pixpro.torch_compat import all_gather_single

TOLERANCE = 2**-7
"""bf16 keeps 8 significant bits: rounding a result costs up to 2**-8 of it. Outputs are compared
relative to max(1, |reference|), input gradients relative to the largest reference gradient: 2**-7 is
twice the rounding, and far below any wrong term (a missing mean or variance term is O(1))."""
STATS_TOLERANCE = 1e-4
"""Statistics stay float32 on both sides: only the summation order differs."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_groups() -> tuple[Any, torch.device]:
    from launch.collectives import Collectives, DistEnv, bind_device

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    env = DistEnv.from_environ()
    device = bind_device(env)
    return Collectives.start(env, device, timeout_s=60.0), device


def _control_plane(col: Any, device: torch.device) -> dict[str, Any]:
    t = time.monotonic()
    ok = {
        "any": col.any(True, False) == (True, False),
        "all": col.all(True) and not col.all(False),
        "broadcast_bytes": col.broadcast_bytes(b"gpu-check") == b"gpu-check",
    }
    col.barrier()
    x = torch.full((1024,), 1.5, device=device)
    dist.all_reduce(x, group=col.data_group)
    gathered = x.new_empty(1024)
    all_gather_single(gathered, x, group=col.data_group)
    ok["data_all_reduce"] = bool(torch.equal(x, gathered) and torch.all(x == 1.5).item())
    return {
        "active": col.active,
        "default_backend": dist.get_backend_config(),
        "control_backend": dist.get_backend_config(col.control),
        "data_group": "default" if col.data_group is None else dist.get_backend_config(col.data_group),
        "collectives_ok": ok,
        "collectives_s": round(time.monotonic() - t, 3),
    }


def _syncbn_vs_fp32(ctx: Ctx, col: Any, device: torch.device) -> dict[str, Any]:
    from pixpro.sync_batchnorm import FUSED_DEVICE_TYPES, _SyncBatchNormFunction

    n, c, h, w = ctx.s["syncbn_shape"]
    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    # what a convolution under bf16 autocast hands a BN layer, and the gradient autocast's backward brings
    x = (torch.randn(n, c, h, w, device=device, generator=gen) * 2 + 0.5).to(torch.bfloat16)
    x = x.contiguous(memory_format=cl)
    grad = (
        torch.randn(n, c, h, w, device=device, generator=gen).to(torch.bfloat16).contiguous(memory_format=cl)
    )
    weight = torch.rand(c, device=device, generator=gen) + 0.5
    bias = torch.randn(c, device=device, generator=gen) * 0.1

    def leaves() -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().clone().requires_grad_(True) for t in (x, weight, bias))

    # fp32 reference on the very same values: the comparison measures the kernels, not input rounding
    xr, wr, br = (t.float().detach().requires_grad_(True) for t in leaves())
    rm_ref, rv_ref = torch.zeros(c, device=device), torch.ones(c, device=device)
    ref = F.batch_norm(xr, rm_ref, rv_ref, wr, br, True, 0.1, 1e-5)
    ref.backward(grad.float())

    xs, ws, bs = leaves()
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)

    def sync_bn(x_in: torch.Tensor, rmean: torch.Tensor, rvar: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y: torch.Tensor = _SyncBatchNormFunction.apply(
                x_in, ws, bs, rmean, rvar, 1e-5, 0.1, col.data_group, 1
            )
        return y

    y = sync_bn(xs, rm, rv)
    y.backward(grad)
    assert xs.grad is not None and xr.grad is not None and ws.grad is not None and bs.grad is not None
    assert wr.grad is not None and br.grad is not None

    def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> float:
        return float(((a.float() - b.float()).abs() / scale).max())

    n_out: dict[str, Any] = {
        "shape": [n, c, h, w],
        "fused_kernels": device.type in FUSED_DEVICE_TYPES,
        "out_dtype": str(y.dtype),
        "out_channels_last": y.is_contiguous(memory_format=cl),
        "grad_channels_last": xs.grad.is_contiguous(memory_format=cl),
        "forward_rel": rel(y, ref, ref.detach().abs().clamp_min(1)),
        "input_grad_rel": rel(xs.grad, xr.grad, xr.grad.abs().max()),
        "weight_grad_rel": rel(ws.grad, wr.grad, wr.grad.abs().max()),
        "bias_grad_rel": rel(bs.grad, br.grad, br.grad.abs().max()),
        "running_mean_abs": float((rm - rm_ref).abs().max()),
        "running_var_rel": rel(rv, rv_ref, rv_ref.abs()),
    }

    # host syncs of one forward + backward (none: the module exists to make none)
    def once() -> None:
        xi = x.detach().requires_grad_(True)
        sync_bn(xi, rm.clone(), rv.clone()).backward(grad)

    syncs = step_syncs(ctx.cpu, once)
    n_out["host_syncs"] = syncs["count"]
    n_out["host_sync_ops"] = syncs["where"]
    if not ctx.cpu:
        ref_bf16 = x.detach().requires_grad_(True)

        def plain() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = F.batch_norm(ref_bf16, rm.clone(), rv.clone(), ws, bs, True, 0.1, 1e-5)
            out.backward(grad)

        once()
        plain()
        n_out["ms_fwd_bwd"] = round(timed(ctx, once, 10) * 1000, 3)
        n_out["batch_norm_ms_fwd_bwd"] = round(timed(ctx, plain, 10) * 1000, 3)
    return n_out


def check_syncbn(ctx: Ctx, rec: Rec, dl: Deadline) -> tuple[str, str]:
    t = time.monotonic()
    col, device = _start_groups()
    rec.set(init_s=round(time.monotonic() - t, 2), device=str(device))
    try:
        rec.set(**_control_plane(col, device))
        dl.check("collectives")
        rec.set(**_syncbn_vs_fp32(ctx, col, device))
    finally:
        col.close()
    n = rec.numbers
    worst = max(n["forward_rel"], n["input_grad_rel"])
    stats = max(n["running_mean_abs"], n["running_var_rel"], n["weight_grad_rel"], n["bias_grad_rel"])
    rec.summary(
        f"groups {n['default_backend']} + control {n['control_backend']}: collectives "
        f"{'ok' if all(n['collectives_ok'].values()) else 'WRONG'}; SyncBN "
        f"({'fused CUDA kernels' if n['fused_kernels'] else 'tensor ops'}) bf16 channels_last vs fp32: "
        f"forward {n['forward_rel']:.1e}, input grad {n['input_grad_rel']:.1e}, stats and weight grads "
        f"{stats:.1e}; {n['host_syncs']} host syncs"
        + (
            f"; {n['ms_fwd_bwd']:.2f} ms vs batch_norm {n['batch_norm_ms_fwd_bwd']:.2f} ms"
            if not ctx.cpu
            else ""
        )
    )
    if not all(n["collectives_ok"].values()):
        return "fail", f"collectives: {n['collectives_ok']}"
    if not ctx.cpu and "cuda:nccl" not in n["default_backend"]:
        return "fail", f"the default group is {n['default_backend']}, not NCCL for CUDA tensors"
    if worst > TOLERANCE or stats > STATS_TOLERANCE:
        return "fail", f"SyncBN differs from fp32 beyond bf16 rounding (tolerance {TOLERANCE:.1e})"
    if not (n["out_channels_last"] and n["grad_channels_last"]):
        return "fail", "SyncBN lost the channels_last layout"
    if n["host_syncs"]:
        return "fail", f"SyncBN syncs the host: {n['host_sync_ops']}"
    return "pass", ""
