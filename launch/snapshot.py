"""A training state copied into shared memory the trainer allocates once, and viewed back in the uploader.

Why: the uploader is a separate process (:mod:`launch.uploader`), so the state must cross a process
boundary without pickling tensors. The trainer copies every tensor into one memfd-backed buffer that it
reuses from save to save (re-allocated only when the state grows); what is left (the nesting, numbers,
strings) is a small picklable *skeleton* with a :class:`Slot` where each tensor was. The uploader maps
the same memory through ``/proc/<trainer pid>/fd/<fd>`` and rebuilds the state as tensors that *are*
slices of that memory: ``torch.save`` then streams straight from it, with no second full copy.
Tensors keep their strides when they are dense (contiguous or channels_last), so a resumed run sees the
same layouts as an uninterrupted one.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64


@dataclass(frozen=True)
class Slot:
    """Where tensor ``index`` of the flat list stood in the state."""

    index: int


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BufferRef:
    """How the uploader finds a buffer: the trainer's pid and fd, its size, and a generation number
    (a re-allocated buffer may reuse the fd number)."""

    pid: int
    fd: int
    nbytes: int
    generation: int


class SharedBuffer:
    """An anonymous shared-memory file (memfd) mapped into this process, freed when the last user
    closes it: a trainer killed outright leaves nothing behind in /dev/shm."""

    _generation = 0

    def __init__(self, nbytes: int) -> None:
        SharedBuffer._generation += 1
        self.nbytes = max(nbytes, ALIGN)
        self.fd = os.memfd_create("pixpro-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.nbytes)
        self._map = mmap.mmap(self.fd, self.nbytes)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.ref = BufferRef(os.getpid(), self.fd, self.nbytes, SharedBuffer._generation)

    def close(self) -> None:
        del self.bytes
        self._map.close()
        os.close(self.fd)


def _dense_stride(t: torch.Tensor) -> tuple[int, ...]:
    """The tensor's own strides when its elements fill a block without gaps, else row-major ones."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return tuple(t.stride())
    stride, step = [], 1
    for size in reversed(t.shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def plan(state: Any) -> tuple[Any, list[torch.Tensor], list[TensorMeta], int]:
    """(skeleton, tensors, their places in a buffer, bytes needed) for a nested dict/list/tuple state."""
    tensors: list[torch.Tensor] = []
    metas: list[TensorMeta] = []
    offset = 0

    def walk(obj: Any) -> Any:
        nonlocal offset
        if isinstance(obj, torch.Tensor):
            nbytes = obj.numel() * obj.element_size()
            metas.append(TensorMeta(obj.dtype, tuple(obj.shape), _dense_stride(obj), offset, nbytes))
            tensors.append(obj)
            offset += -(-nbytes // ALIGN) * ALIGN
            return Slot(len(tensors) - 1)
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(walk(v) for v in obj)
        return obj

    skeleton = walk(state)
    return skeleton, tensors, metas, offset


def _view(raw: torch.Tensor, m: TensorMeta) -> torch.Tensor:
    if m.nbytes == 0:
        return torch.empty(m.shape, dtype=m.dtype)
    return raw[m.offset : m.offset + m.nbytes].view(m.dtype).as_strided(m.shape, m.stride)


def copy_in(buffer: SharedBuffer, tensors: list[torch.Tensor], metas: list[TensorMeta]) -> None:
    """The trainer's part of a save: one copy of each tensor into the buffer (device to host included)."""
    for t, m in zip(tensors, metas, strict=True):
        if m.nbytes:
            _view(buffer.bytes, m).copy_(t.detach())


def rebuild(skeleton: Any, raw: torch.Tensor, metas: list[TensorMeta]) -> Any:
    """The uploader's view of the state: tensors whose storage is exactly their slice of ``raw``."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, Slot):
            m = metas[obj.index]
            if m.nbytes == 0:
                return torch.empty(m.shape, dtype=m.dtype)
            # frombuffer gives each tensor its own storage (its slice): torch.save writes just that
            piece = torch.frombuffer(raw, dtype=torch.uint8, count=m.nbytes, offset=m.offset)
            return piece.view(m.dtype).as_strided(m.shape, m.stride)
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(walk(v) for v in obj)
        return obj

    return walk(skeleton)


def map_buffer(ref: BufferRef) -> mmap.mmap:
    """The uploader's mapping of the trainer's buffer (same memory, not a copy)."""
    fd = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDWR)
    try:
        return mmap.mmap(fd, ref.nbytes)
    finally:
        os.close(fd)
