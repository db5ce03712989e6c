"""tests.support.host_syncs.HostSyncCounter: what it counts (so a zero from it means something)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.support.host_syncs import HostSyncCounter

T = torch.tensor([0.5, -1.0, 2.0, 2.0, -3.0])
MASK = T > 0

SYNCING: dict[str, tuple[Callable[[], Any], str]] = {
    "item": (lambda: T.sum().item(), "aten._local_scalar_dense.default"),
    "float": (lambda: float(T.sum()), "aten._local_scalar_dense.default"),
    "int": (lambda: int(T[0]), "aten._local_scalar_dense.default"),
    "if tensor": (lambda: 1 if MASK.any() else 0, "aten._local_scalar_dense.default"),
    "tolist": (lambda: T.tolist(), "tolist"),
    "bool mask": (lambda: T[MASK], "aten.index.Tensor[bool mask]"),
    "bool mask set": (lambda: T.clone().__setitem__(MASK, 0.0), "aten.index_put_.default[bool mask]"),
    "nonzero": (lambda: MASK.nonzero(), "aten.nonzero.default"),
    "where(cond)": (lambda: torch.where(MASK), "aten.nonzero.default"),
    "masked_select": (lambda: T.masked_select(MASK), "aten.masked_select.default"),
    "unique": (lambda: T.unique(), "aten._unique2.default"),
    "unique_consecutive": (lambda: T.unique_consecutive(), "aten.unique_consecutive.default"),
    "repeat_interleave": (
        lambda: T.repeat_interleave(torch.tensor([1, 2, 1, 1, 1])),
        "aten.repeat_interleave.Tensor",
    ),
    "equal": (lambda: torch.equal(T, T), "aten.equal.default"),
    "allclose": (lambda: torch.allclose(T, T), "aten.allclose.default"),
}

NOT_SYNCING: dict[str, Callable[[], Any]] = {
    "matmul": lambda: T @ T,
    "integer index": lambda: T[torch.tensor([0, 2])],
    "masked_fill": lambda: T.masked_fill(MASK, 0.0),
    "where(cond, a, b)": lambda: torch.where(MASK, T, 0.0),
    "repeat_interleave with output_size": lambda: T.repeat_interleave(
        torch.tensor([1, 2, 1, 1, 1]), output_size=6
    ),
    "batch norm forward and backward": lambda: (
        torch.nn.BatchNorm1d(5)(T.view(1, 5).repeat(3, 1).requires_grad_()).sum().backward()
    ),
}


@pytest.mark.parametrize("name", list(SYNCING))
def test_counts_each_syncing_op_once(name: str) -> None:
    fn, op = SYNCING[name]
    with HostSyncCounter() as syncs:
        fn()
    assert dict(syncs.ops) == {op: 1}
    assert syncs.count == 1
    assert op in syncs.report() and "test_host_syncs.py" in syncs.first_stack[op]


@pytest.mark.parametrize("name", list(NOT_SYNCING))
def test_ignores_ops_that_do_not_sync(name: str) -> None:
    with HostSyncCounter() as syncs:
        NOT_SYNCING[name]()
    assert syncs.count == 0, syncs.report()


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if grad.sum() > 0:  # a sync that only backward() runs
            grad = grad * 1.0
        return grad[grad != 0].sum() * 0 + grad * 2


def test_sees_the_ops_autograd_runs_in_backward() -> None:
    x = T.clone().requires_grad_()
    loss = _ReadsInBackward.apply(x).sum()
    with HostSyncCounter() as syncs:
        loss.backward()
    assert dict(syncs.ops) == {"aten._local_scalar_dense.default": 1, "aten.index.Tensor[bool mask]": 1}


def test_cpu_false_ignores_host_tensors_and_the_mode_is_gone_after() -> None:
    with HostSyncCounter(cpu=False) as syncs:
        T.sum().item()
        T.tolist()
        T[MASK]
    assert syncs.count == 0
    with HostSyncCounter() as outer:
        pass
    T.sum().item()  # outside: not counted
    assert outer.count == 0
