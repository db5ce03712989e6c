"""Batches collated into shared memory that each DataLoader worker reuses, batch after batch.

A worker normally collates every batch into newly created shared memory, which the kernel then has to
map and zero page by page as the batch is written: for ImageNet-sized views that costs about a third of a
sample's decoding (``benches/bench_augment.py``, the loader rows). Here each worker keeps a few batch
buffers, made once, and writes into one the trainer has handed back. The trainer hands a batch back
(:meth:`SharedBatches.release`) once it has done with its host tensors; a batch that is never handed back
just keeps its slot, and a worker that finds none of its slots free collates the usual way, so a consumer
that never releases gets the stock behaviour, never a buffer overwritten under it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

PREFETCH = 2  # batches each DataLoader worker works ahead (torch's default)
SLOT_KEY = "shared_slot"  # the batch's (slot, claim) pair, for release()
_NUMBERS: dict[type, torch.dtype] = {int: torch.int64, float: torch.float64}


class SharedBatches:
    """The DataLoader's ``collate_fn`` for batches of dicts (tensors and numbers), with slot reuse.

    ``state`` (shared by all processes) holds, per slot, 0 when it is free or the claim number of the batch
    it carries; each worker uses only its own ``slots_per_worker`` slots, so no two processes claim one.
    """

    def __init__(self, num_workers: int, slots_per_worker: int) -> None:
        if num_workers < 1 or slots_per_worker < 1:
            raise ValueError(f"need workers and slots, got {num_workers} and {slots_per_worker}")
        self.slots_per_worker = slots_per_worker
        self.state = torch.zeros(num_workers * slots_per_worker, dtype=torch.int64).share_memory_()
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # this worker process's, made on first use
        self._claims = itertools.count(1)
        self._pid = 0

    def __call__(self, samples: list[Mapping[str, Any]]) -> dict[str, Any]:
        info = get_worker_info()
        if info is None or info.id >= len(self.state) // self.slots_per_worker:
            return default_collate(samples)  # the main process loads (nothing to share), or no slots
        mine = range(info.id * self.slots_per_worker, (info.id + 1) * self.slots_per_worker)
        if self._pid != os.getpid():  # a new worker process: the buffers of any earlier one died with it
            self._pid, self._buffers = os.getpid(), {}
            self.state[mine.start : mine.stop] = 0
        slot = next((s for s in mine if int(self.state[s]) == 0), None)
        if slot is None:
            return default_collate(samples)  # all of this worker's batches are still downstream
        buffers = self._buffers.setdefault(slot, {})
        out: dict[str, Any] = {}
        for key in samples[0]:
            # numbers as default_collate makes them: ints int64, floats float64
            values = [torch.as_tensor(s[key], dtype=_NUMBERS.get(type(s[key]))) for s in samples]
            shape, dtype = (len(values), *values[0].shape), values[0].dtype
            buf = buffers.get(key)
            if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or len(buf) < len(values):
                layout = _layout(values[0])
                buf = buffers[key] = torch.empty(shape, dtype=dtype, memory_format=layout).share_memory_()
            out[key] = torch.stack(values, out=buf[: len(values)])
        claim = (self._pid << 32) + next(self._claims)  # unique across worker processes and batches
        out[SLOT_KEY] = torch.tensor([slot, claim])
        self.state[slot] = claim
        return out

    def release(self, batch: Mapping[str, Any]) -> None:
        """Hand a batch's slot back: its host tensors will be overwritten by a later batch. A batch from
        stock collation, or from a worker process that has since been replaced, is left alone."""
        pair = batch.get(SLOT_KEY)
        if pair is None:
            return
        slot, claim = (int(v) for v in pair)
        if int(self.state[slot]) == claim:  # only the worker sets a slot non-zero, and only when it is 0
            self.state[slot] = 0


def _layout(value: torch.Tensor) -> torch.memory_format:
    """Channels-last for a batch of channels-last images (the crops come out so): each view is then one
    plain copy, about a tenth of the cost of transposing it to planar; the photometric step on the
    training device converts it after the move, as part of its cast to float."""
    packed = value.dim() == 3 and value[None].is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if packed and not value.is_contiguous() else torch.contiguous_format


def loader_collate(num_workers: int) -> SharedBatches | None:
    """The trainer's ``collate_fn`` for ``num_workers`` workers working :data:`PREFETCH` batches ahead: per
    worker, slots for its prefetched batches and the one being trained on (None: torch's own, no workers)."""
    return SharedBatches(num_workers, PREFETCH + 1) if num_workers else None


def release(loader: DataLoader, batch: Mapping[str, Any]) -> None:
    """Hand ``batch`` back to ``loader``'s workers if it collates with :class:`SharedBatches`."""
    if isinstance(loader.collate_fn, SharedBatches):
        loader.collate_fn.release(batch)
