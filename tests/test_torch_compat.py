"""pixpro.torch_compat: on the pinned torch each shim is the new API; with that API gone (torch 2.11, the
lent GPU machines' image) it is the old one, with the same result."""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pixpro import torch_compat
from pixpro.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_pinned_torch_has_every_new_api() -> None:
    """torch 2.14.1 (requirements.lock): no shim takes its old path there."""
    assert torch_compat.HAS_ALL_GATHER_SINGLE
    assert torch_compat.HAS_FORWARD_SYNC_BUFFERS
    assert torch_compat.HAS_BATCHNORM_BIAS


@pytest.mark.parametrize("new_api", [True, False])
def test_all_gather_single_gathers_the_same_either_way(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch, new_api: bool
) -> None:
    monkeypatch.setattr(torch_compat, "HAS_ALL_GATHER_SINGLE", new_api)
    row = torch.arange(5, dtype=torch.float32)
    out = torch.full((5,), -1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor is deprecated in 2.14
        torch_compat.all_gather_single(out, row)
    assert torch.equal(out, row)


@pytest.mark.parametrize("new_api", [True, False])
def test_ddp_skips_the_buffer_broadcast_before_each_forward_either_way(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch, new_api: bool
) -> None:
    monkeypatch.setattr(torch_compat, "HAS_FORWARD_SYNC_BUFFERS", new_api)
    kwargs = torch_compat.no_forward_buffer_sync()
    assert list(kwargs) == (["forward_sync_buffers"] if new_api else ["broadcast_buffers"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers is deprecated in 2.13
        ddp = DistributedDataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), **kwargs)
    assert ddp.forward_sync_buffers is False


def test_batch_norms_keep_their_bias_or_its_absence() -> None:
    assert convert_sync_batchnorm(nn.BatchNorm2d(4, bias=False)).bias is None
    assert convert_sync_batchnorm(nn.BatchNorm2d(4)).bias is not None


def test_without_the_bias_argument_a_batch_norm_has_a_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11 has no ``bias=``: ours is built without the keyword, with a bias as torch's are; one
    without a bias cannot exist there, and asking for it is refused, not ignored."""
    monkeypatch.setattr(torch_compat, "HAS_BATCHNORM_BIAS", False)
    assert torch_compat.batchnorm_bias(True) == {}
    assert SyncBatchNorm(4).bias is not None
    with pytest.raises(ValueError, match="no batch norm without a bias"):
        SyncBatchNorm(4, bias=False)
