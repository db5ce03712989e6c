"""Counting the ops that make the host wait for the device, on any machine (a CPU one included).

A device->host synchronization (``.item()``, ``if tensor:``, a boolean mask, ``nonzero``...) stalls the
CPU until the GPU queue drains; one per layer per step is enough to starve a GPU. On a GPU they are
found with ``torch.cuda.set_sync_debug_mode``, but CI has no GPU, so :class:`HostSyncCounter` counts the
aten ops that WOULD sync if their tensors lived on a GPU: run the code on CPU tensors inside it and
assert ``counter.count == 0``; a failure names the ops (``counter.ops``) and where the first of each
came from (``counter.first_stack``).

Counted:

- ``aten._local_scalar_dense``: ``.item()``, ``float()``, ``int()``, ``bool()`` / ``if t:`` (through
  ``is_nonzero``);
- ``Tensor.tolist()``: on a CPU tensor it reads memory without any aten op, so a torch-function mode
  catches it (on a GPU tensor its device->host copy is counted once, as ``tolist``);
- ops whose output shape depends on values: ``nonzero`` (``argwhere``, ``where(cond)``),
  ``masked_select``, ``unique``/``unique_consecutive``, ``repeat_interleave`` without ``output_size``,
  and indexing with a boolean (or uint8) mask: ``index.Tensor``, ``index_put(_)``;
- ``equal``, ``allclose`` and ``is_nonzero`` (a host bool), ``bincount`` (its length is the maximum);
- a blocking copy from a non-CPU device to the CPU (``.cpu()``, ``.to("cpu")``, ``copy_``): only seen on
  a GPU machine.

Ops run by autograd in ``backward()`` are seen too (tested on CPU; on CUDA the engine's device
threads get the mode with the rest of ``at::ThreadLocalState``, not checked here without a GPU).
With ``cpu=False`` only ops on non-CPU tensors count, for a GPU run whose host-side tensors (sampler
indices...) may be read. Every op goes through Python while it is active: count in one run, time in
another.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SYNCING_OPS", "HostSyncCounter"]

aten = torch.ops.aten

SYNCING_OPS: frozenset[Any] = frozenset(
    {
        aten._local_scalar_dense,
        aten.nonzero,
        aten.masked_select,
        aten._unique,
        aten._unique2,
        aten.unique_dim,
        aten.unique_consecutive,
        aten.unique_dim_consecutive,
        aten.equal,
        aten.allclose,
        aten.is_nonzero,
        aten.bincount,
    }
)
"""Op packets that always need the host to see device values (their output or its shape)."""

_MASK_INDEXED = frozenset({aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_})
_MASK_DTYPES = (torch.bool, torch.uint8)
# Stacks in first_stack leave out torch's own frames and this module's: what is left is the caller's.
_SKIPPED_DIRS = (os.path.dirname(torch.__file__), os.path.abspath(__file__))
_REPEAT_BY_TENSOR = frozenset({aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor})


def _has_mask_index(args: Sequence[Any]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices or ())


def _is_device_to_host_copy(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    packet = func.overloadpacket
    if packet is aten._to_copy:
        device = kwargs.get("device")
        return (
            device is not None
            and torch.device(device).type == "cpu"
            and args[0].device.type != "cpu"
            and not kwargs.get("non_blocking", False)
        )
    if packet is aten.copy_:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[0].device.type == "cpu" and args[1].device.type != "cpu" and not non_blocking
    return False


class _TolistMode(TorchFunctionMode):
    """Sees ``Tensor.tolist``, which on a CPU tensor dispatches no aten op at all."""

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not torch.Tensor.tolist:
            return func(*args, **kwargs)
        self.counter._record("tolist", args)
        self.counter._quiet += 1  # its device->host copy (GPU) is this same sync
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._quiet -= 1


class HostSyncCounter(TorchDispatchMode):
    """Context manager counting the ops that force a device->host synchronization.

    ``count`` is the total, ``ops`` a Counter by op name (``aten.index.Tensor[bool mask]``,
    ``aten._local_scalar_dense.default``, ``tolist``...), ``first_stack`` the Python stack of each op
    name's first occurrence (torch's own frames left out). ``cpu=False`` ignores ops whose tensors are
    all on the CPU. Usage::

        with HostSyncCounter() as syncs:
            loss = model(x).sum()
            loss.backward()
        assert syncs.count == 0, syncs.report()
    """

    def __init__(self, cpu: bool = True) -> None:
        super().__init__()
        self.cpu = cpu
        self.ops: Counter[str] = Counter()
        self.first_stack: dict[str, str] = {}
        self._quiet = 0
        self._tolist = _TolistMode(self)

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def report(self) -> str:
        """One line per syncing op: its count and where it first came from (for an assertion message)."""
        if not self.ops:
            return "no host syncs"
        lines = [f"{n} x {name}" for name, n in self.ops.most_common()]
        lines += [f"--- first {name}:\n{stack}" for name, stack in self.first_stack.items()]
        return "\n".join(lines)

    def __enter__(self) -> HostSyncCounter:
        self._tolist.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._tolist.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            self._tolist.__exit__(exc_type, exc, tb)

    def _record(self, name: str, args: Sequence[Any]) -> None:
        if not self.cpu and all(t.device.type == "cpu" for t in _tensors(args)):
            return
        self.ops[name] += 1
        if name not in self.first_stack:
            frames = [f for f in traceback.extract_stack() if not f.filename.startswith(_SKIPPED_DIRS)]
            self.first_stack[name] = "".join(traceback.format_list(frames[-8:]))

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if not self._quiet:
            name = self._sync_name(func, args, kwargs)
            if name is not None:
                self._record(name, args)
        return func(*args, **kwargs)

    @staticmethod
    def _sync_name(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
        packet = func.overloadpacket
        if packet in SYNCING_OPS:
            return str(func)
        if packet in _MASK_INDEXED:
            return f"{func}[bool mask]" if _has_mask_index(args) else None
        if func in _REPEAT_BY_TENSOR:
            return str(func) if kwargs.get("output_size") is None else None
        if _is_device_to_host_copy(func, args, kwargs):
            return f"{func}[device->host]"
        return None


def _tensors(args: Sequence[Any]) -> Iterator[torch.Tensor]:
    return (a for a in tree_leaves(list(args)) if isinstance(a, torch.Tensor))
