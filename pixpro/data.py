"""Image files on disk -> deterministic two-view training samples.

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
from torchvision.io import ImageReadMode, decode_image, read_file

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_SEED_MASK = (1 << 63) - 1
# torchvision 0.29 deprecates its decoders with a warning on every call; they are still the fastest
# dependency-free path, so the notice is silenced locally rather than spamming every epoch.
_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision"
# torchvision errors start with "<function>, <source>.cpp:<line>, "; only the reason helps a user.
_CPP_PREFIX = re.compile(r"^[\w()]+, \S+:\d+, ")


class DatasetError(ValueError):
    """A dataset folder that cannot be used (missing, empty, or entirely unreadable)."""


def _find_images(root: Path) -> list[Path]:
    """JPEG/PNG files under ``root`` by relative path; a folder reached twice via links is read once."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a folder linked twice
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()  # visit order decides which of two links to one folder is kept
        found.extend(Path(dirpath, f) for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _decode_rgb(path: Path) -> torch.Tensor:
    """Decode one file to uint8 ``[3, H, W]`` RGB, raising ``RuntimeError`` with a short reason."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as error:
            raise RuntimeError(_CPP_PREFIX.sub("", str(error))) from error
    if image.dtype == torch.uint16:  # 16-bit PNG
        image = torch.div(image.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)
    return image


class ImageFolder:
    """Every JPEG/PNG under ``root`` (class subfolders or flat), in a deterministic order.

    Files that cannot be decoded, or whose shorter side is below ``min_size``, are skipped with one
    warning per file (per process) and replaced by the next usable index, wrapping around, so
    ``load(i)`` is still a pure function of ``i``.
    """

    def __init__(self, root: str | Path, min_size: int = 0) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DatasetError(f"dataset path {self.root} is not a folder")
        self.paths: list[Path] = _find_images(self.root)
        if not self.paths:
            raise DatasetError(f"no JPEG or PNG images under {self.root}")
        self.min_size = int(min_size)
        self._unusable: set[int] = set()  # indices already warned about in this process

    def __len__(self) -> int:
        return len(self.paths)

    def _try_load(self, index: int) -> torch.Tensor | None:
        if index in self._unusable:
            return None
        path = self.paths[index]
        try:
            image = _decode_rgb(path)
        except (RuntimeError, OSError) as error:
            reason = f"unreadable ({error})"
        else:
            if min(image.shape[-2:]) >= self.min_size:
                return image
            reason = f"{image.shape[-1]}x{image.shape[-2]} is smaller than min_size {self.min_size}"
        self._unusable.add(index)
        warnings.warn(f"skipping image {path}: {reason}", stacklevel=2)
        return None

    def load_indexed(self, index: int) -> tuple[int, torch.Tensor]:
        """The image at ``index`` (or the next usable one) and the index it actually came from."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        index %= n
        for offset in range(n):
            candidate = (index + offset) % n
            image = self._try_load(candidate)
            if image is not None:
                return candidate, image
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

    ``transform(image, generator)`` must return ``(view1, view2, coords1, coords2)`` (for example the
    ``TwoViews`` NamedTuple of :mod:`pixpro.augment`).
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
        image = self.folder.load(index)
        view1, view2, coords1, coords2 = self.transform(image, sample_generator(self.seed, epoch, index))
        return {"view1": view1, "view2": view2, "coords1": coords1, "coords2": coords2, "index": index}
