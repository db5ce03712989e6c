"""Generate ``schemas/backbones.json``: which torchvision backbones the trainer can use.

    python -m launch.tools.backbones [--write | --check]

Builds every classification model of ``torchvision.models`` on the meta device (no memory, no
weights) through :func:`pixpro.model.build_backbone`, the trainer's own code, and measures the last
feature map for growing crops: ``min_crop`` is the smallest crop side (>= 32) whose last feature map is
at least 2x2, ``stride`` the family's output stride. Here, not in :mod:`schemas.backbones`, because it
imports torch: the login node only reads the table.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from schemas.backbones import FORMAT, MIN_CROP, TABLE_PATH
from schemas.generated import generated_file_main

_MAX_SEARCH = 1024


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
    lo, hi = MIN_CROP, _MAX_SEARCH
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
        "format": FORMAT,
        "torchvision": torchvision.__version__.split("+")[0],
        "backbones": usable,
        "unsupported": unsupported,
    }


def table_text(table: dict[str, Any]) -> str:
    """The exact text of ``backbones.json`` for a table."""
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generated_file_main(
        "python -m launch.tools.backbones", __doc__, TABLE_PATH, lambda: table_text(generate()), argv
    )


if __name__ == "__main__":
    sys.exit(main())
