"""Which torchvision backbones the trainer can use, and how small a crop each one tolerates.

The table lives in ``backbones.json`` beside this module, generated from torchvision itself by
:mod:`launch.tools.backbones` (``python -m launch.tools.backbones --write``; ``--check`` exits 1 when
it is stale) so the login node can check a spec without importing torch: a backbone name torchvision
does not have, or a crop so small that the last feature map would be 1x1 (BatchNorm then refuses a
per-rank batch of 1 and PixPro has no pairs of cells), fails in ``pixpro validate`` instead of hours
later on the cluster.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT", "MIN_CROP", "TABLE_PATH", "Backbone", "backbone", "backbone_names", "unsupported_backbones",
]  # fmt: skip

TABLE_PATH = Path(__file__).with_name("backbones.json")
"""The generated table (package data)."""

MIN_CROP = 32  # the schema's lower bound of data.crop_size
FORMAT = "pixpro-backbones/1"


class Backbone:
    """One usable backbone: torchvision module family, output stride and smallest usable crop."""

    __slots__ = ("channels", "family", "min_crop", "name", "stride")

    def __init__(self, name: str, family: str, stride: int, min_crop: int, channels: int) -> None:
        self.name, self.family, self.stride = name, family, stride
        self.min_crop, self.channels = min_crop, channels

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, stride={self.stride}, min_crop={self.min_crop})"


@functools.cache
def _table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def backbone_names() -> tuple[str, ...]:
    """Names the trainer can build, sorted (the schema's enum of ``model.backbone``)."""
    return tuple(sorted(_table()["backbones"]))


def unsupported_backbones() -> dict[str, str]:
    """torchvision classification models that are not convolutional feature extractors, with why."""
    return dict(_table()["unsupported"])


def backbone(name: str) -> Backbone | None:
    """The table entry of ``name``, or None if the trainer cannot use it."""
    entry = _table()["backbones"].get(name)
    return None if entry is None else Backbone(name, **entry)
