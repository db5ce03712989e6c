"""The PixPro model: an online branch trained by gradients and an EMA target branch.

Online: backbone -> projector -> PPM (-> instance projector -> predictor when the instance loss is on).
Target: EMA copies of backbone and projector(s), no PPM, no gradients, always in train mode so its BN
normalizes with the batch's statistics as in the official code. Each view goes through each branch
separately, so BN statistics are per view.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pixpro.geometry import cell_geometry, positive_mask
from pixpro.losses import consistency_loss, instance_loss, pixcontrast_loss
from pixpro.model import PixelPropagation, Predictor, Projector, build_backbone


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """Average-pool a ``[B, C, h, w]`` map to a normalized ``[B, C]`` instance embedding."""
    # a mean, not adaptive_avg_pool2d: its CUDA backward has no deterministic kernel (``deterministic``)
    return F.normalize(x.mean((2, 3)), dim=1)


class PixPro(nn.Module):
    """PixPro (or PixContrast) with an optional BYOL instance branch; ``forward`` returns the losses."""

    def __init__(
        self,
        backbone: str = "resnet50",
        projector_hidden: int = 4096,
        projector_out: int = 256,
        ppm_gamma: float = 2.0,
        ppm_layers: int = 1,
        positive_threshold: float = 0.7,
        loss: Literal["pixpro", "pixcontrast"] = "pixpro",
        pixcontrast_tau: float = 0.3,
        instance_weight: float = 0.0,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("pixpro", "pixcontrast"):
            raise ValueError(f"unknown loss {loss!r}; use 'pixpro' or 'pixcontrast'")
        if instance_weight < 0:
            raise ValueError(f"instance_weight must be >= 0, got {instance_weight}")
        self.loss_type = loss
        self.positive_threshold = positive_threshold
        self.pixcontrast_tau = pixcontrast_tau
        self.instance_weight = instance_weight

        self.backbone, channels = build_backbone(backbone, zero_init_residual)
        self.projector = Projector(channels, projector_hidden, projector_out)
        # Modules that take no part in the loss are not built: DDP rejects parameters without gradients.
        self.ppm = PixelPropagation(projector_out, ppm_gamma, ppm_layers) if loss == "pixpro" else None
        self.instance_projector: nn.Module | None = None
        self.predictor: nn.Module | None = None
        if instance_weight > 0:
            self.instance_projector = Projector(channels, projector_hidden, projector_out)
            self.predictor = Predictor(projector_out, projector_hidden)

        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        self.target_instance_projector = copy.deepcopy(self.instance_projector)
        for module in self._target_modules():
            module.requires_grad_(False)

    def _online_modules(self) -> list[nn.Module]:
        modules = [self.backbone, self.projector, self.instance_projector]
        return [m for m in modules if m is not None]

    def _target_modules(self) -> list[nn.Module]:
        modules = [self.target_backbone, self.target_projector, self.target_instance_projector]
        return [m for m in modules if m is not None]

    def online_encoder(self) -> nn.Module:
        """The online backbone, whose ``state_dict`` is what gets exported for transfer."""
        return self.backbone

    def train(self, mode: bool = True) -> PixPro:
        """Switch the online branch; the target branch always stays in train mode (batch-stat BN)."""
        super().train(mode)
        for module in self._target_modules():
            module.train(True)
        return self

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the parameters, ``t <- m t + (1 - m) o``; buffers (BN running stats) are not averaged."""
        online: list[torch.Tensor] = [p for m in self._online_modules() for p in m.parameters()]
        target: list[torch.Tensor] = [p for m in self._target_modules() for p in m.parameters()]
        if len(online) != len(target):
            raise RuntimeError("online and target branches have different parameter lists")
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, coords1: torch.Tensor, coords2: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Losses for one batch of view pairs.

        ``coords`` are each view's geometry: boxes ``[B, 4]`` or coordinate maps ``[B, 3, H, W]`` (see
        :mod:`pixpro.geometry`). Returns ``loss`` (differentiable total) and detached ``pixel_loss``,
        ``instance_loss`` (0 when off) and ``positives`` (mean positive pairs per image).
        """
        feat1, feat2 = self.backbone(view1), self.backbone(view2)
        proj1, proj2 = self.projector(feat1), self.projector(feat2)
        with torch.no_grad():
            target_feat1, target_feat2 = self.target_backbone(view1), self.target_backbone(view2)
            target1 = F.normalize(self.target_projector(target_feat1), dim=1)
            target2 = F.normalize(self.target_projector(target_feat2), dim=1)

        geom1 = cell_geometry(coords1.to(feat1.device), *feat1.shape[-2:])
        geom2 = cell_geometry(coords2.to(feat2.device), *feat2.shape[-2:])
        mask12 = positive_mask(geom1, geom2, self.positive_threshold)
        mask21 = mask12.transpose(1, 2)

        if self.ppm is not None:
            pixel = consistency_loss(self.ppm(proj1), target2, mask12) + consistency_loss(
                self.ppm(proj2), target1, mask21
            )
        else:
            q1, q2 = F.normalize(proj1, dim=1).flatten(2), F.normalize(proj2, dim=1).flatten(2)
            tau = self.pixcontrast_tau
            pixel = pixcontrast_loss(q1, target2.flatten(2), mask12, tau, geom2.valid) + pixcontrast_loss(
                q2, target1.flatten(2), mask21, tau, geom1.valid
            )

        total = pixel
        instance = torch.zeros((), device=pixel.device)
        if self.instance_projector is not None and self.predictor is not None:
            pred1 = _pooled(self.predictor(self.instance_projector(feat1)))
            pred2 = _pooled(self.predictor(self.instance_projector(feat2)))
            with torch.no_grad():
                assert self.target_instance_projector is not None
                z1 = _pooled(self.target_instance_projector(target_feat1))
                z2 = _pooled(self.target_instance_projector(target_feat2))
            instance = instance_loss(pred1, z2) + instance_loss(pred2, z1)
            total = total + self.instance_weight * instance

        return {
            "loss": total,
            "pixel_loss": pixel.detach(),
            "instance_loss": instance.detach(),
            "positives": mask12.sum((1, 2)).mean().detach(),
        }
