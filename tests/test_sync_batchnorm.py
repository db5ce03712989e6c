"""pixpro.sync_batchnorm: synchronized BN on gloo equals one BatchNorm2d over the whole batch, no host syncs.

One spawn of two gloo ranks (module fixture ``ranks``) runs every distributed scenario and saves what
it saw; the tests compare it with single-process ``nn.BatchNorm2d`` references computed here. The
gradient convention: each rank's loss is ``(y_rank * fixed_weights_rank).sum()``, the reference loss is
their sum, so a rank's input gradient is its slice of the reference's and the reference's parameter
gradients are the sum over ranks of the local ones (DDP would average them).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import Tensor, nn

from pixpro import sync_batchnorm
from pixpro.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests.support.host_syncs import HostSyncCounter

pytestmark = pytest.mark.xdist_group("syncbn")  # under xdist one worker spawns the ranks, once

WORLD = 2
N, C, H, W = 8, 6, 5, 5
ITERS = 3

# name -> (BN keyword arguments, how the batch of N splits over the ranks, fused kernels emulated)
CONFIGS: dict[str, tuple[dict[str, Any], tuple[int, int], bool]] = {
    "fp32": ({"momentum": 0.1}, (4, 4), False),
    "uneven_cumulative": ({"momentum": None}, (3, 5), False),
    "no_affine_untracked": ({"affine": False, "track_running_stats": False}, (4, 4), False),
    "no_bias_fp64": ({"bias": False}, (5, 3), False),
    "ncl_input": ({"momentum": 0.3}, (2, 6), False),
    "fused_emulated": ({"momentum": 0.1}, (3, 5), True),
    "fused_emulated_cumulative": ({"momentum": None}, (5, 3), True),
}


# ---- data shared by the ranks and the references ----


def batch(it: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Iteration ``it``'s whole batch ``[N, C, H, W]`` (per-channel offsets and scales) and loss weights."""
    g = torch.Generator().manual_seed(1000 + it)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.5, 3.0, C, dtype=torch.float64).view(1, C, 1, 1) + torch.arange(
        C, dtype=torch.float64
    ).view(1, C, 1, 1)
    return x.to(dtype), torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)


def make_bn(cls: type[nn.modules.batchnorm._BatchNorm], kw: dict[str, Any], dtype: torch.dtype) -> Any:
    bn = cls(C, **kw).to(dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
        if bn.bias is not None:
            bn.bias.copy_(0.3 * torch.randn(C, generator=g))
    return bn


def config_dtype(name: str) -> torch.dtype:
    return torch.float64 if name.endswith("fp64") else torch.float32


def rank_slice(split: tuple[int, int], rank: int) -> slice:
    return slice(sum(split[:rank]), sum(split[: rank + 1]))


def params(bn: Any) -> list[Tensor]:
    return [p for p in (bn.weight, bn.bias) if p is not None]


def run_bn(bn: Any, xs: Iterator[tuple[Tensor, Tensor]], autocast: bool = False) -> list[dict[str, Any]]:
    """Forward + backward per batch: the output, grad of the input and of each parameter."""
    steps = []
    for x, w in xs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = bn(x)
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        loss = (y.to(acc) * w.to(acc)).sum()
        grads = torch.autograd.grad(loss, [x, *params(bn)])
        steps.append({"y": y.detach(), "grad_x": grads[0], "grad_params": list(grads[1:])})
    return steps


def buffers(bn: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in bn.state_dict().items() if "running" in k or "num_batches" in k}


# ---- the fused (CUDA) kernels, emulated on the CPU to run the fused branch's wiring ----


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _cv(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def emulated_kernels() -> dict[str, Callable[..., Any]]:
    """Plain-op versions of torch's SyncBN CUDA kernels with their dtype contracts checked
    (aten/src/ATen/native/cuda/Normalization.cu{,h}: stats in the accumulate type, ``counts`` read in
    the running statistics' dtype (else the input's), ``count`` as int32 per rank)."""

    def stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(x.to(_acc(x)), dim=_dims(x), correction=0)
        return mean, torch.rsqrt(var + eps)

    def gather(x, mean_all, invstd_all, rm, rv, momentum, eps, counts):
        assert mean_all.dim() == 2 and mean_all.dtype == invstd_all.dtype == _acc(x)
        assert counts.dtype == (rm.dtype if rm is not None else x.dtype), "counts in the kernel's dtype"
        n = counts.to(mean_all.dtype)[:, None]
        total = n.sum(0)
        mean = (mean_all * n).sum(0) / total
        m2 = ((invstd_all.pow(-2) - eps) * n).sum(0) + ((mean_all - mean) ** 2 * n).sum(0)
        if rm is not None:
            rm.copy_((1 - momentum) * rm + momentum * mean)
            rv.copy_((1 - momentum) * rv + momentum * m2 / (total - 1))
        return mean, torch.rsqrt(m2 / total + eps)

    def elemt(x, weight, bias, mean, invstd, eps):
        y = (x.to(mean.dtype) - _cv(mean, x)) * _cv(invstd, x)
        if weight is not None:
            y = y * _cv(weight.to(mean.dtype), x) + _cv(bias.to(mean.dtype), x)
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return y.to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def backward_reduce(g, x, mean, invstd, weight, input_g, weight_g, bias_g):
        gf = g.to(mean.dtype)
        sum_dy = gf.sum(_dims(x))
        sum_dy_xmu = (gf * (x.to(mean.dtype) - _cv(mean, x))).sum(_dims(x))
        return (
            sum_dy if input_g else None,
            sum_dy_xmu if input_g else None,
            (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
            sum_dy.to(weight.dtype) if bias_g else None,
        )

    def backward_elemt(g, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        assert count.dtype == torch.int32 and count.is_contiguous()
        assert weight is None or weight.dtype == mean.dtype
        n = count.sum().to(mean.dtype)
        xmu = x.to(mean.dtype) - _cv(mean, x)
        gi = g.to(mean.dtype) - _cv(sum_dy / n, x) - xmu * _cv(invstd * invstd * sum_dy_xmu / n, x)
        gi = gi * _cv(invstd if weight is None else invstd * weight, x)
        return gi.to(x.dtype)

    return {
        "batch_norm_stats": stats,
        "batch_norm_gather_stats_with_counts": gather,
        "batch_norm_elemt": elemt,
        "batch_norm_backward_reduce": backward_reduce,
        "batch_norm_backward_elemt": backward_elemt,
    }


# ---- what each rank runs ----


def _rank_configs(rank: int) -> dict[str, Any]:
    out = {}
    for name, (kw, split, fused) in CONFIGS.items():
        dtype = config_dtype(name)
        saved = {k: getattr(torch, k) for k in emulated_kernels()} if fused else {}
        if fused:
            sync_batchnorm.FUSED_DEVICE_TYPES.add("cpu")
            for k, fn in emulated_kernels().items():
                setattr(torch, k, fn)
        try:
            bn = make_bn(SyncBatchNorm, kw, dtype)
            sl = rank_slice(split, rank)
            # "ncl": the batch as [n, C, H * W] (BatchNorm1d's shape); the same per-channel statistics
            shape = (-1, C, H * W) if "ncl" in name else (-1, C, H, W)
            xs = (
                (x[sl].reshape(shape).requires_grad_(), w[sl].reshape(shape))
                for x, w in map(lambda i: batch(i, dtype), range(ITERS))
            )
            steps = run_bn(bn, xs)
            for step in steps:
                step["y"], step["grad_x"] = step["y"].view(-1, C, H, W), step["grad_x"].view(-1, C, H, W)
            out[name] = {"steps": steps, "buffers": buffers(bn)}
        finally:
            sync_batchnorm.FUSED_DEVICE_TYPES.discard("cpu")
            for k, fn in saved.items():
                setattr(torch, k, fn)
    return out


def _rank_bf16(rank: int) -> dict[str, Any]:
    """bf16 channels-last input under CPU autocast, as the trainer feeds BN from a bf16 conv."""
    bn = make_bn(SyncBatchNorm, {"momentum": 0.1}, torch.float32)
    sl = rank_slice((4, 4), rank)
    xs = (
        (x[sl].to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_(), w[sl])
        for x, w in map(batch, range(ITERS))
    )
    return {"steps": run_bn(bn, xs, autocast=True), "buffers": buffers(bn)}


def _rank_host_syncs(rank: int) -> dict[str, Any]:
    """Host syncs and collectives of one forward + backward per BN flavour."""
    calls = {"all_gather_single": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    out: dict[str, Any] = {}
    x_all, w_all = batch(0)
    sl = rank_slice((4, 4), rank)
    flavours: dict[str, dict[str, Any]] = {"momentum": {"momentum": 0.1}, "cumulative": {"momentum": None}}
    for name, kw in flavours.items():
        bn = make_bn(SyncBatchNorm, kw, torch.float32)
        x = x_all[sl].clone().requires_grad_()
        for n in calls:
            setattr(dist, n, counting(n))
        try:
            with HostSyncCounter() as syncs:
                loss = (bn(x) * w_all[sl]).sum()
                loss.backward()
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        out[name] = {"syncs": dict(syncs.ops), "calls": dict(calls)}
        calls.update(dict.fromkeys(calls, 0))
    # Contrast: the same counter in the same rank sees a boolean mask and BatchNorm2d's cumulative average.
    with HostSyncCounter() as mask:
        x_all[x_all > 0].sum()
    with HostSyncCounter() as plain:
        nn.BatchNorm2d(C, momentum=None)(x_all)
    out["contrast"] = {"mask": dict(mask.ops), "batchnorm2d_cumulative": dict(plain.ops)}
    return out


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _rank_ddp(rank: int) -> dict[str, Any]:
    """Two SGD steps of DDP (buffers not broadcast) with our SyncBN, and with per-rank BN as a control."""
    out = {}
    for name in ("sync", "plain"):
        model = small_model()
        if name == "sync":
            model = convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(2):
            x = torch.randn(4, 3, 8, 8, generator=g) * (1 + rank)
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
        out[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = {
            "configs": _rank_configs(rank),
            "again": _rank_configs(rank),  # the same computation a second time: bitwise equal
            "bf16": _rank_bf16(rank),
            "host_syncs": _rank_host_syncs(rank),
            "ddp": _rank_ddp(rank),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("syncbn")
    mp.start_processes(
        _worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, start_method="spawn", join=True
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def reference(name: str, dtype: torch.dtype | None = None) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Single-process nn.BatchNorm2d over the whole batch, the same iterations."""
    kw, _, _ = CONFIGS.get(name, ({"momentum": 0.1}, None, False))
    dtype = dtype or config_dtype(name)
    bn = make_bn(nn.BatchNorm2d, kw, dtype)
    xs = ((x.clone().requires_grad_(), w) for x, w in map(lambda i: batch(i, dtype), range(ITERS)))
    return run_bn(bn, xs), buffers(bn)


# ---- the tests ----


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_batchnorm_over_the_whole_batch(ranks: list[dict[str, Any]], name: str) -> None:
    ref_steps, ref_buffers = reference(name)
    split = CONFIGS[name][1]
    tol = 1e-5 if config_dtype(name) == torch.float32 else 1e-12
    for it, ref in enumerate(ref_steps):
        got = [r["configs"][name]["steps"][it] for r in ranks]
        for rank in range(WORLD):
            sl = rank_slice(split, rank)
            assert got[rank]["y"].dtype == ref["y"].dtype
            torch.testing.assert_close(got[rank]["y"], ref["y"][sl], atol=tol, rtol=tol)
            torch.testing.assert_close(got[rank]["grad_x"], ref["grad_x"][sl], atol=tol, rtol=tol)
        assert len(ref["grad_params"]) == len(got[0]["grad_params"])
        for i, ref_grad in enumerate(ref["grad_params"]):
            torch.testing.assert_close(sum(g["grad_params"][i] for g in got), ref_grad, atol=tol, rtol=tol)
    for rank in range(WORLD):
        got_buffers = ranks[rank]["configs"][name]["buffers"]
        assert got_buffers.keys() == ref_buffers.keys()
        for key, value in ref_buffers.items():
            torch.testing.assert_close(got_buffers[key], value, atol=tol, rtol=tol)
    if "num_batches_tracked" in ref_buffers:
        assert ref_buffers["num_batches_tracked"].item() == ITERS
        assert not torch.allclose(ref_buffers["running_var"], torch.ones_like(ref_buffers["running_var"]))


@pytest.mark.slow
def test_bf16_autocast_channels_last(ranks: list[dict[str, Any]]) -> None:
    """bf16 in, bf16 out (as nn.BatchNorm2d under CPU autocast and torch's SyncBN on CUDA), same memory
    format; statistics in fp32: the running statistics equal fp32 BN's on the bf16-rounded input."""
    bn = nn.BatchNorm2d(C)
    x_cl = batch(0)[0].to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn(x_cl).dtype == torch.bfloat16
    rounded = [(x.bfloat16().float(), w) for x, w in map(batch, range(ITERS))]
    ref_bn = make_bn(nn.BatchNorm2d, {"momentum": 0.1}, torch.float32)
    ref_steps = run_bn(ref_bn, ((x.requires_grad_(), w) for x, w in rounded))
    for rank, result in enumerate(ranks):
        sl = rank_slice((4, 4), rank)
        for got, ref in zip(result["bf16"]["steps"], ref_steps, strict=True):
            for key in ("y", "grad_x"):
                assert got[key].dtype == torch.bfloat16, key
                assert got[key].is_contiguous(memory_format=torch.channels_last), key
                assert not got[key].is_contiguous(), key
                torch.testing.assert_close(got[key].float(), ref[key][sl], atol=2e-2, rtol=1.6e-2)
        for key, value in buffers(ref_bn).items():
            torch.testing.assert_close(result["bf16"]["buffers"][key], value, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_no_host_sync_and_one_collective_each_way(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        syncs = result["host_syncs"]
        for flavour in ("momentum", "cumulative"):
            assert syncs[flavour]["syncs"] == {}, flavour
            assert syncs[flavour]["calls"] == {"all_gather_single": 1, "all_reduce": 1}, flavour
        # The counter does see syncs in the same process: a boolean mask, BatchNorm2d's float(n).
        assert syncs["contrast"]["mask"] == {"aten.index.Tensor[bool mask]": 1}
        assert syncs["contrast"]["batchnorm2d_cumulative"] == {"aten._local_scalar_dense.default": 1}


@pytest.mark.slow
def test_bitwise_deterministic_and_equal_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        for name in CONFIGS:
            first, again = result["configs"][name], result["again"][name]
            for a, b in zip(first["steps"], again["steps"], strict=True):
                assert torch.equal(a["y"], b["y"]) and torch.equal(a["grad_x"], b["grad_x"]), name
                assert all(map(torch.equal, a["grad_params"], b["grad_params"])), name
            assert all(torch.equal(first["buffers"][k], again["buffers"][k]) for k in first["buffers"]), name
    for name in CONFIGS:  # every rank combines the same gathered rows in the same order
        b0, b1 = (r["configs"][name]["buffers"] for r in ranks)
        assert all(torch.equal(b0[k], b1[k]) for k in b0), name


@pytest.mark.slow
def test_ddp_step_keeps_parameters_and_buffers_equal_without_broadcast(ranks: list[dict[str, Any]]) -> None:
    sync = [r["ddp"]["sync"] for r in ranks]
    plain = [r["ddp"]["plain"] for r in ranks]
    assert sync[0].keys() == plain[0].keys()
    for key in sync[0]:
        assert torch.equal(sync[0][key], sync[1][key]), key
    assert not torch.equal(sync[0]["1.running_mean"], torch.zeros(4))
    # Control: per-rank BatchNorm2d under the same DDP step lets the buffers drift apart.
    assert not torch.equal(plain[0]["1.running_mean"], plain[1]["1.running_mean"])
    assert not torch.equal(plain[0]["4.running_var"], plain[1]["4.running_var"])


def test_convert_resnet18_keeps_state_and_swaps_every_batchnorm() -> None:
    model = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            state = m.state_dict(keep_vars=True)
            state["running_mean"].normal_(generator=g)
            state["running_var"].uniform_(0.5, 2.0, generator=g)
            state["num_batches_tracked"].fill_(5)
            state["weight"].data.normal_(generator=g)
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.layer2.eval()
    before = model.state_dict()
    before_tensors = {k: v.clone() for k, v in before.items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    training = {name: m.training for name, m in model.named_modules()}

    converted = convert_sync_batchnorm(model)
    assert converted is model
    assert n_bn == 20
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    after = converted.state_dict()
    assert list(after) == list(before)
    for key, value in before_tensors.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key
        assert after[key].data_ptr() == before[key].data_ptr(), key  # the very same tensors
    assert not converted.layer1[0].bn1.weight.requires_grad
    assert converted.layer1[0].bn2.weight.requires_grad
    assert {name: m.training for name, m in converted.named_modules()} == training

    # Checkpoints move both ways, strictly.
    plain = torchvision.models.resnet18(weights=None)
    plain.load_state_dict(converted.state_dict())
    converted.load_state_dict(plain.state_dict())


@pytest.mark.parametrize(
    "bn",
    [
        nn.BatchNorm1d(5, momentum=None),
        nn.BatchNorm2d(5, affine=False).to(torch.bfloat16),
        nn.BatchNorm3d(5, track_running_stats=False),
        nn.BatchNorm2d(5, bias=False),
        nn.SyncBatchNorm(5, eps=1e-3).to(torch.float64),
    ],
    ids=["1d", "2d-noaffine-bf16", "3d-untracked", "2d-nobias", "torch-sync-fp64"],
)
def test_convert_a_single_layer(bn: nn.modules.batchnorm._BatchNorm) -> None:
    expected = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.eval()
    out = convert_sync_batchnorm(bn, process_group=None)
    assert type(out) is SyncBatchNorm and out is not bn
    assert (out.eps, out.momentum, out.affine, out.track_running_stats, out.training) == (
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        False,
    )
    assert out.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(out.state_dict()[key], value) and out.state_dict()[key].dtype == value.dtype
    assert all(t.device.type == "cpu" for t in [*out.parameters(), *out.buffers()])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_process_group_it_is_batchnorm2d(momentum: float | None) -> None:
    """World size 1 (no process group) and eval mode: bitwise nn.BatchNorm2d."""
    assert not dist.is_initialized()
    ours, theirs = (
        make_bn(SyncBatchNorm, {"momentum": momentum}, torch.float32),
        make_bn(nn.BatchNorm2d, {"momentum": momentum}, torch.float32),
    )
    for it in range(2):
        x = batch(it)[0]
        assert torch.equal(ours(x), theirs(x))
    assert all(
        torch.equal(a, b) for a, b in zip(buffers(ours).values(), buffers(theirs).values(), strict=True)
    )
    ours.eval()
    theirs.eval()
    x = batch(5)[0].to(memory_format=torch.channels_last)
    assert torch.equal(ours(x), theirs(x))
