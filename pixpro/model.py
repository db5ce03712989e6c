"""Backbone, projector, pixel propagation module (PPM) and instance predictor.

The backbone is any torchvision classification model cut at its last feature map with torchvision's
feature extraction, so its ``state_dict`` keys are the classifier's keys minus the head and exported
weights load into a stock torchvision model (or detectron2 after key renaming) with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

_EXAMPLE_BACKBONES = (
    "resnet18",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "convnext_tiny",
    "regnet_y_400mf",
)


def _feature_node(model: nn.Module, name: str) -> str:
    """Name of the graph node that produces the last ``[B, C, h, w]`` feature map."""
    if isinstance(model, torchvision.models.ResNet):
        return "layer4"
    if isinstance(model, torchvision.models.RegNet):
        return "trunk_output"
    if isinstance(model, torchvision.models.SwinTransformer):
        return "permute"  # `features` is channels-last; `permute` restores [B, C, h, w] after the final norm
    if isinstance(getattr(model, "features", None), nn.Module):
        return "features"
    raise ValueError(
        f"backbone {name!r} has no known last feature map (expected a ResNet, a RegNet or a model with "
        "`.features`)"
    )


def _zero_init_residual_branches(model: nn.Module) -> None:
    """Zero the last BN gamma of every residual branch so each block starts as the identity.

    ResNets get this from torchvision's ``zero_init_residual``; this covers the other families
    torchvision builds from BN residual blocks (RegNet, MobileNet, EfficientNet). ConvNeXt needs
    nothing: its layer scale already starts at 1e-6.
    """
    for module in model.modules():
        if isinstance(module, torchvision.models.regnet.ResBottleneckBlock):
            branch = module.f
        elif getattr(module, "use_res_connect", False):
            branch = module  # identity shortcut: every BN in the block is on the residual branch
        else:
            continue
        norms = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
        if norms:
            nn.init.zeros_(norms[-1].weight)


def build_backbone(name: str, zero_init_residual: bool = True) -> tuple[nn.Module, int]:
    """A torchvision classifier cut at its last feature map: ``(module -> [B, C, h, w], C)``.

    The returned module is torchvision's train/eval-aware fx ``GraphModule`` with its output rewritten
    from a dict to the bare tensor, so there is no wrapper and the parameter names stay torchvision's
    (``conv1.weight``, ``layer4.2.bn3.weight``, ...).
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(
            f"unknown backbone {name!r}; use a torchvision classification model such as "
            f"{', '.join(_EXAMPLE_BACKBONES)} (all: torchvision.models.list_models(torchvision.models))"
        )
    is_resnet = torchvision.models.get_model_builder(name).__module__ == "torchvision.models.resnet"
    kwargs = {"zero_init_residual": zero_init_residual} if is_resnet else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if zero_init_residual and not is_resnet:
        _zero_init_residual_branches(model)

    body = create_feature_extractor(model, return_nodes={_feature_node(model, name): "out"})
    for graph in {id(g): g for g in (body.train_graph, body.eval_graph)}.values():
        output = next(node for node in graph.nodes if node.op == "output")
        output.args = (output.args[0]["out"],)
        graph.lint()
    body.recompile()

    body.eval()
    with torch.no_grad():
        channels = body(torch.zeros(1, 3, 64, 64)).shape[1]
    body.train()
    return body, int(channels)


class Projector(nn.Sequential):
    """Per-cell MLP as 1x1 convs (conv-BN-ReLU-conv), the official code's ``MLP2d``."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_dim, hidden_dim, 1),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )


class Predictor(Projector):
    """Instance-branch predictor (256-4096-256), applied per cell before average pooling as O does."""

    def __init__(self, dim: int = 256, hidden_dim: int = 4096) -> None:
        super().__init__(dim, hidden_dim, dim)


def propagate(x: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """Un-normalized pixel propagation ``y_i = sum_j max(cos(x_i, x_j), 0)^gamma v_j`` within one view.

    ``x`` ``[B, C, h, w]`` gives the similarities, ``v`` ``[B, D, h, w]`` the values; returns
    ``[B, D, h, w]``.
    """
    b, _, h, w = x.shape
    xn = F.normalize(x.flatten(2), dim=1)  # [B, C, n]
    sim = torch.bmm(xn.transpose(1, 2), xn).clamp(min=0).pow(gamma)  # [B, n_i, n_j]
    y = torch.bmm(v.flatten(2), sim.transpose(1, 2))  # [B, D, n_i]
    return y.view(b, -1, h, w)


class PixelPropagation(nn.Module):
    """The PPM: smooths each view's projected features over similar cells, then L2-normalizes.

    The value transform ``g`` has 0 (identity), 1 (1x1 conv with bias, the default) or 2 layers
    (conv-BN-ReLU-conv); its output is normalized before propagation as in the official code.
    """

    def __init__(self, dim: int = 256, gamma: float = 2.0, layers: int = 1) -> None:
        super().__init__()
        self.gamma = gamma
        if layers == 0:
            self.transform: nn.Module = nn.Identity()
        elif layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        elif layers == 2:
            self.transform = Projector(dim, dim, dim)
        else:
            raise ValueError(f"PPM transform must have 0, 1 or 2 layers, got {layers}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.transform(x), dim=1)
        return F.normalize(propagate(x, v, self.gamma), dim=1)
