"""Where each feature-map cell of a view lies in the original image, and which cells pair.

A view's geometry comes in one of two forms, both in the official code's normalized convention
(x / (W - 1), y / (H - 1) of the original image):

* a box ``[B, 4]`` = ``[x_ul, y_ul, x_lr, y_lr]`` for crops, resizes and flips (exact, analytic; a
  horizontal flip swaps ``x_ul`` and ``x_lr``);
* a coordinate map ``[B, 3, H, W]`` = per output pixel ``(x, y, valid)`` for any other spatial
  transform; ``valid`` is 0 where the pixel came from padding.

Both reduce to per-cell centres ``[B, h*w, 2]``, a validity mask ``[B, h*w]`` and a bin diagonal
``[B]``; :func:`positive_mask` pairs cells whose centres lie closer than ``threshold`` bin diagonals.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class CellGeometry(NamedTuple):
    centres: torch.Tensor  # [B, h*w, 2] (x, y) in normalized original-image coordinates
    valid: torch.Tensor  # [B, h*w] bool: False for cells that touch padding
    bin_diagonal: torch.Tensor  # [B] length of one cell's diagonal, same units as centres


def box_geometry(boxes: torch.Tensor, h: int, w: int) -> CellGeometry:
    """Analytic cell centres of an ``h x w`` map over each box, as the official code computes them."""
    boxes = boxes.to(torch.float32)
    x_ul, y_ul, x_lr, y_lr = boxes.unbind(-1)
    bin_w = (x_lr - x_ul) / w
    bin_h = (y_lr - y_ul) / h
    cols = torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5
    rows = torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5
    cx = x_ul[:, None, None] + cols[None, None, :] * bin_w[:, None, None]
    cy = y_ul[:, None, None] + rows[None, :, None] * bin_h[:, None, None]
    cx, cy = torch.broadcast_tensors(cx, cy)
    centres = torch.stack([cx, cy], dim=-1).reshape(boxes.shape[0], h * w, 2)
    valid = torch.ones(boxes.shape[0], h * w, dtype=torch.bool, device=boxes.device)
    return CellGeometry(centres, valid, torch.sqrt(bin_w**2 + bin_h**2))


def map_geometry(coord_map: torch.Tensor, h: int, w: int) -> CellGeometry:
    """Cell centres of an ``h x w`` map from a per-pixel coordinate map ``[B, 3, H, W]``.

    A cell is valid only if every pixel in it is valid (came from inside the source image), so
    padding never forms a positive pair. The bin diagonal is measured from the centres themselves:
    the root mean square over valid cells of the distance to the next column's and next row's centre,
    which equals the analytic diagonal for crops and flips and is invariant under rotation.
    """
    coord_map = coord_map.to(torch.float32)
    b = coord_map.shape[0]
    pixel_valid = (coord_map[:, 2:3] > 0.5).to(coord_map.dtype)
    centres = F.adaptive_avg_pool2d(coord_map[:, :2], (h, w))  # [B, 2, h, w]
    valid = F.adaptive_avg_pool2d(pixel_valid, (h, w))[:, 0] > 1.0 - 1e-6  # [B, h, w]

    d_col = (centres[:, :, :, 1:] - centres[:, :, :, :-1]).pow(2).sum(1)  # [B, h, w-1]
    d_row = (centres[:, :, 1:, :] - centres[:, :, :-1, :]).pow(2).sum(1)  # [B, h-1, w]
    v_col = (valid[:, :, 1:] & valid[:, :, :-1]).to(coord_map.dtype)
    v_row = (valid[:, 1:, :] & valid[:, :-1, :]).to(coord_map.dtype)
    mean_col = (d_col * v_col).flatten(1).sum(1) / v_col.flatten(1).sum(1).clamp_min(1)
    mean_row = (d_row * v_row).flatten(1).sum(1) / v_row.flatten(1).sum(1).clamp_min(1)
    diagonal = torch.sqrt(mean_col + mean_row)

    centres = centres.permute(0, 2, 3, 1).reshape(b, h * w, 2)
    return CellGeometry(centres, valid.reshape(b, h * w), diagonal)


def cell_geometry(coords: torch.Tensor, h: int, w: int) -> CellGeometry:
    """Dispatch on the geometry's form: boxes ``[B, 4]`` or coordinate maps ``[B, 3, H, W]``."""
    if coords.dim() == 2 and coords.shape[-1] == 4:
        return box_geometry(coords, h, w)
    if coords.dim() == 4 and coords.shape[1] == 3:
        return map_geometry(coords, h, w)
    raise ValueError(f"view coordinates must be boxes [B, 4] or maps [B, 3, H, W], got {tuple(coords.shape)}")


def positive_mask(g1: CellGeometry, g2: CellGeometry, threshold: float = 0.7) -> torch.Tensor:
    """``[B, n1, n2]`` float mask: 1 where cell i of view 1 and cell j of view 2 are a positive pair.

    Distances are divided by the larger of the two views' bin diagonals (the official rule); invalid
    cells never pair.
    """
    dist = (g1.centres[:, :, None] - g2.centres[:, None]).norm(dim=-1)  # [B, n1, n2], exact (no mm trick)
    scale = torch.maximum(g1.bin_diagonal, g2.bin_diagonal)[:, None, None]
    mask = dist / scale < threshold
    mask &= g1.valid[:, :, None] & g2.valid[:, None, :]
    return mask.to(g1.centres.dtype)
