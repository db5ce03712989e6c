"""Images from a folder or a packed dataset -> deterministic two-view training samples.

The sample stream is a pure function of ``(seed, epoch, index)``: each sample draws its augmentation
from its own generator seeded by those three numbers, and unreadable files are replaced by the next
readable one in a fixed order. A resumed run, or one with a different DataLoader worker count,
therefore sees exactly the same tensors as an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode  # importing torchvision.io registers torch.ops.image

from pixpro.sources import ImageSource, ReadFailed, SourceError, open_source

_SEED_MASK = (1 << 63) - 1
# torchvision errors start with "<function>, <source>.cpp:<line>, "; only the reason helps a user.
_CPP_PREFIX = re.compile(r"^[\w()]+, \S+:\d+, ")


class DatasetError(ValueError):
    """A dataset that cannot be used (missing, empty, or entirely undecodable): bad input."""


class DataUnavailable(RuntimeError):
    """The storage failed :data:`MAX_READ_FAILURES` reads in a row, after retries: an infrastructure
    failure (the rank fails and torchrun restarts it), not bad input; walking on would only warn about
    every later image."""


MAX_READ_FAILURES = 8


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode one encoded image to uint8 ``[3, H, W]`` RGB, raising ``RuntimeError`` with a short reason."""
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        # torchvision's own op: its Python wrapper (decode_image) only adds a deprecation warning on every
        # call, and silencing that per call costs more than the wrapper
        image = torch.ops.image.decode_image(encoded, ImageReadMode.RGB.value, True)  # EXIF orientation
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(_CPP_PREFIX.sub("", str(error))) from error
    if image.dtype == torch.uint16:  # 16-bit PNG
        image = torch.div(image.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)
    return image


class ImageFolder:
    """The images of a folder (local path or fsspec URL, class subfolders or flat) or of a packed dataset
    (``pixpro pack``; recognised by its manifest), by global index in one deterministic order.

    Images that cannot be read or decoded, or whose shorter side is below ``min_size``, are skipped with
    one warning per image (per process) and replaced by the next usable index, wrapping around, so
    ``load(i)`` is a pure function of ``i`` as long as the storage answers. A read that keeps failing
    after retries (:class:`~pixpro.sources.ReadFailed`) is skipped the same way but not remembered: the
    next epoch tries again; :data:`MAX_READ_FAILURES` of them in one walk raise
    :class:`DataUnavailable`. ``skipped`` counts the replacements this process made.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        min_size: int = 0,
        storage_options: dict[str, Any] | None = None,
        source: ImageSource | None = None,
    ) -> None:
        self.root = os.fspath(root)
        try:
            self.source: ImageSource = source or open_source(root, storage_options)
        except SourceError as error:
            raise DatasetError(str(error)) from None
        self.min_size = int(min_size)
        self.skipped = 0
        self._unusable: set[int] = set()  # indices already warned about in this process

    def __len__(self) -> int:
        return len(self.source)

    @property
    def paths(self) -> list[Path]:
        """Every image's path (a local folder only): one object per image, for tools and tests."""
        return [Path(self.root, self.source.name(i)) for i in range(len(self.source))]

    def _try_load(self, index: int) -> tuple[torch.Tensor | None, bool]:
        """The image, or None and whether the read failed (a storage problem, not the image's)."""
        if index in self._unusable:
            return None, False
        where = f"{self.root}/{self.source.name(index)}"
        transient = False
        if not self.source.usable(index):
            reason = "undecodable when it was packed"
        else:
            try:
                image = decode_rgb(self.source.read(index))
            except ReadFailed as error:
                reason, transient = f"read failed ({error})", True
            except (RuntimeError, OSError) as error:
                reason = f"unreadable ({error})"
            else:
                if min(image.shape[-2:]) >= self.min_size:
                    return image, False
                reason = f"{image.shape[-1]}x{image.shape[-2]} is smaller than min_size {self.min_size}"
        if not transient:
            self._unusable.add(index)
        self.skipped += 1
        warnings.warn(f"skipping image {where}: {reason}", stacklevel=2)
        return None, transient

    def load_indexed(self, index: int) -> tuple[int, torch.Tensor]:
        """The image at ``index`` (or the next usable one) and the index it actually came from."""
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        index %= n
        failed = 0
        for offset in range(n):
            candidate = (index + offset) % n
            image, read_failed = self._try_load(candidate)
            if image is not None:
                return candidate, image
            failed += read_failed
            if failed == MAX_READ_FAILURES:
                raise DataUnavailable(
                    f"{self.root}: {failed} reads in a row failed after retries (from image {index}): "
                    "the storage is not answering"
                )
        raise DatasetError(f"none of the {n} images under {self.root} is usable (see warnings)")

    def load(self, index: int) -> torch.Tensor:
        """uint8 ``[3, H, W]`` RGB image at ``index``, or the next usable one if it is unusable."""
        return self.load_indexed(index)[1]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """63-bit seed for one sample; SeedSequence keeps nearby ``(epoch, index)`` streams independent."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    sequence = np.random.SeedSequence(seed, spawn_key=(epoch, index))
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) & _SEED_MASK


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU generator seeded for one sample, so augmentation never depends on global RNG state."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


TwoViewTransformFn = Callable[[torch.Tensor, torch.Generator], Sequence[torch.Tensor]]


class TwoViewDataset(Dataset):
    """Map-style dataset keyed by ``(epoch, index)`` so samples never depend on workers or resume point.

    ``transform(image, generator)`` must return ``(view1, view2, coords1, coords2)`` or a NamedTuple
    whose fields name the sample's keys (``TwoViews`` or ``TwoCrops`` of :mod:`pixpro.augment`).
    """

    def __init__(self, folder: ImageFolder, transform: TwoViewTransformFn, seed: int) -> None:
        self.folder = folder
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"TwoViewDataset is indexed by (epoch, index) tuples, got {key!r}")
        epoch, index = (int(k) for k in key)
        source_index, image = self.folder.load_indexed(index)
        out = self.transform(image, sample_generator(self.seed, epoch, index))
        fields = getattr(out, "_fields", ("view1", "view2", "coords1", "coords2"))
        # "skipped": the image came from another index (unreadable, undecodable or too small here)
        return {**dict(zip(fields, out, strict=True)), "index": index, "skipped": int(source_index != index)}
