"""Image-level labelled data for the linear and kNN evaluations, and its held-out split.

Three layouts, recognised in this order:

* demo scenes (``images/`` + ``masks/``, as :mod:`pixpro.demo_data` writes them): each scene's label is
  its mask's dominant object class (background never wins; a scene without objects is left out);
* ``train/`` and ``val/`` folders of class sub-folders (ImageNet's layout): val is the held-out split;
* one folder or packed dataset (``pixpro pack`` keeps the class sub-folder names) of class sub-folders:
  every fifth image of each class, in name order, is held out (a stratified, deterministic 20%).

Images are read through the trainer's own :class:`pixpro.data.ImageFolder` (local or fsspec, folder or
pack, unreadable files skipped), never held in memory all at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from launch.tools.weights import WeightsError
from pixpro.data import DatasetError, ImageFolder
from pixpro.sources import class_labels

HOLD_OUT_EVERY = 5


@dataclass
class LabelledSplit:
    images: ImageFolder
    indices: np.ndarray  # int64 positions in ``images``
    labels: np.ndarray  # int64 class ids

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class LabelledData:
    train: LabelledSplit
    test: LabelledSplit
    classes: list[str]
    layout: str  # "demo scenes", "train/val folders" or "class folders"
    left_out: int = 0  # images without a label (demo scenes without objects)


def _open(root: str | Path, storage_options: dict[str, Any] | None = None) -> ImageFolder:
    try:
        return ImageFolder(root, storage_options=storage_options)
    except DatasetError as exc:
        raise WeightsError(str(exc)) from None


def dominant_class(mask: np.ndarray, ignore: int = 255) -> int | None:
    """The most frequent non-background (non-zero, non-ignored) class id of a mask, or None."""
    counts = np.bincount(mask[(mask != 0) & (mask != ignore)].ravel(), minlength=1)
    return int(counts.argmax()) if counts.sum() else None


def _demo_scenes(root: Path) -> LabelledData:
    images = _open(root / "images")
    try:
        names = json.loads((root / "classes.json").read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    keep, labels = [], []
    for i in range(len(images)):
        mask_path = root / "masks" / Path(images.source.name(i)).with_suffix(".png").name
        try:
            with Image.open(mask_path) as m:
                label = dominant_class(np.asarray(m.convert("L") if m.mode not in ("L", "P") else m))
        except OSError:
            label = None
        if label is not None:
            keep.append(i)
            labels.append(label - 1)  # id 0 is the background
    classes = [str(n) for n in names[1:]]  # id 0, the background, is no scene's label
    classes += [f"class{k + 1}" for k in range(len(classes), max(labels, default=-1) + 1)]
    data = _stratified(images, np.array(keep), np.array(labels), classes, "demo scenes")
    data.left_out = len(images) - len(keep)
    return data


def _class_folder(
    root: str | Path, storage_options: dict[str, Any] | None = None
) -> tuple[ImageFolder, np.ndarray, list[str]]:
    images = _open(root, storage_options)
    classes, labels = class_labels([images.source.name(i) for i in range(len(images))])
    if not classes:
        raise WeightsError(f"{root}: no class sub-folders (images must sit in one folder per class)")
    return images, labels.astype(np.int64), classes


def _stratified(
    images: ImageFolder, indices: np.ndarray, labels: np.ndarray, classes: list[str], layout: str
) -> LabelledData:
    position = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        position[members] = np.arange(len(members))
    held = position % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    return LabelledData(
        LabelledSplit(images, indices[~held], labels[~held]),
        LabelledSplit(images, indices[held], labels[held]),
        classes,
        layout,
    )


def load_labelled(root: str | Path, storage_options: dict[str, Any] | None = None) -> LabelledData:
    """The train and held-out splits of ``root``; one-line errors for unusable data. ``storage_options``
    reach fsspec for a URL (the demo-scenes and train/val layouts are local only)."""
    local = Path(root) if "://" not in str(root) else None
    if local is not None and not local.exists():
        raise WeightsError(f"data folder {root} does not exist")
    if local is not None and (local / "images").is_dir() and (local / "masks").is_dir():
        data = _demo_scenes(local)
    elif local is not None and (local / "train").is_dir() and (local / "val").is_dir():
        train, train_labels, classes = _class_folder(local / "train")
        test, test_labels, test_classes = _class_folder(local / "val")
        if test_classes != classes:
            raise WeightsError(f"{root}: train/ and val/ hold different class folders")
        data = LabelledData(
            LabelledSplit(train, np.flatnonzero(train_labels >= 0), train_labels[train_labels >= 0]),
            LabelledSplit(test, np.flatnonzero(test_labels >= 0), test_labels[test_labels >= 0]),
            classes,
            "train/val folders",
        )
    else:
        images, labels, classes = _class_folder(root, storage_options)
        keep = np.flatnonzero(labels >= 0)
        data = _stratified(images, keep, labels[keep], classes, "class folders")
    if len(data.train) < 2 or len(data.test) < 1 or len(np.unique(data.train.labels)) < 2:
        raise WeightsError(
            f"{root}: {len(data.train)} training and {len(data.test)} held-out images in "
            f"{len(np.unique(data.train.labels))} classes; need at least 2 classes, 2 training and 1 held-out"
        )
    return data
