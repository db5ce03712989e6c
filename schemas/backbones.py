"""Which torchvision backbones the trainer can use, and how small a crop each one tolerates.

The table lives in ``backbones.json`` beside this module, generated from torchvision itself
(``python -m schemas.backbones --write``; ``--check`` exits 1 when it is stale) so the login node can
check a spec without importing torch: a backbone name torchvision does not have, or a crop so small
that the last feature map would be 1x1 (BatchNorm then refuses a per-rank batch of 1 and PixPro has
no pairs of cells), fails in ``pixpro validate`` instead of hours later on the cluster.

Generation builds every classification model of ``torchvision.models`` on the meta device (no
memory, no weights) through :func:`pixpro.model.build_backbone`, the trainer's own code, and measures
the last feature map for growing crops: ``min_crop`` is the smallest crop side (>= 32) whose last
feature map is at least 2x2, ``stride`` the family's output stride.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["TABLE_PATH", "Backbone", "backbone", "backbone_names", "unsupported_backbones"]

TABLE_PATH = Path(__file__).with_name("backbones.json")
"""The generated table (package data)."""

_MIN_CROP = 32  # the schema's lower bound of data.crop_size
_MAX_SEARCH = 1024
_FORMAT = "pixpro-backbones/1"


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


# ------------------------------------------------------------------------------- generation (torch)
def _last_map(body: Any, crop: int) -> tuple[int, int]:
    import torch

    with torch.no_grad():
        out = body(torch.empty(1, 3, crop, crop, device="meta"))
    return int(out.shape[-2]), int(out.shape[-1])


def _measure(name: str) -> tuple[dict[str, Any] | None, str]:
    """(entry, "") for a usable backbone, else (None, reason)."""
    import torch
    import torchvision

    from pixpro.model import build_backbone

    family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    try:
        try:
            with torch.device("meta"):
                body, channels = build_backbone(name, zero_init_residual=True)
        except NotImplementedError:  # an initializer that reads tensor data (Swin's position index)
            body, channels = build_backbone(name, zero_init_residual=True)
            body = body.to("meta")
    except ValueError as exc:
        return None, " ".join(str(exc).split())[:160]
    body.eval()

    def fits(crop: int) -> bool:
        try:
            return min(_last_map(body, crop)) >= 2
        except Exception:  # too small for an inner layer (a pooling window larger than its input)
            return False

    if not fits(_MAX_SEARCH):
        return None, f"last feature map below 2x2 even at {_MAX_SEARCH} px"
    lo, hi = _MIN_CROP, _MAX_SEARCH
    if fits(lo):
        hi = lo
    while hi - lo > 1:  # invariant: not fits(lo), fits(hi); fitting is monotonic in the crop side
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    side = _last_map(body, 512)[0]
    return {"family": family, "stride": round(512 / side), "min_crop": hi, "channels": channels}, ""


def generate() -> dict[str, Any]:
    """The table for the installed torchvision (imports torch: a developer tool, never the CLI)."""
    import torchvision

    usable: dict[str, Any] = {}
    unsupported: dict[str, str] = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        entry, reason = _measure(name)
        if entry is None:
            unsupported[name] = reason
        else:
            usable[name] = entry
    return {
        "format": _FORMAT,
        "torchvision": torchvision.__version__.split("+")[0],
        "backbones": usable,
        "unsupported": unsupported,
    }


def table_text(table: dict[str, Any]) -> str:
    """The exact text of ``backbones.json`` for a table."""
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.backbones", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {TABLE_PATH.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    text = table_text(generate())
    if args.write:
        TABLE_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {TABLE_PATH}", file=sys.stderr)
        return 0
    if args.check:
        current = TABLE_PATH.read_text(encoding="utf-8") if TABLE_PATH.is_file() else None
        if current != text:
            print(f"{TABLE_PATH} is stale; run: python -m schemas.backbones --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
