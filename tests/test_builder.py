import pytest
import torch
from torch import nn

from pixpro.builder import PixPro
from pixpro.lars import LARS, lars_param_groups

SMALL = dict(backbone="resnet18", projector_hidden=64, projector_out=32)


def _batch(b: int = 3, size: int = 64):
    torch.manual_seed(0)
    views = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    coords1 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]][:b])
    coords2 = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.9, 0.9]][:b])
    return views, (coords1, coords2)


def _disjoint_batch(b: int = 2, size: int = 64):
    views = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    coords1 = torch.tensor([[0.0, 0.0, 0.3, 0.3]]).repeat(b, 1)
    coords2 = torch.tensor([[0.6, 0.6, 1.0, 1.0]]).repeat(b, 1)
    return views, (coords1, coords2)


def _target_params(model: PixPro) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith("target_")]


def test_training_step_is_finite_and_only_online_gets_gradients():
    model = PixPro(**SMALL)
    optimizer = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    (v1, v2), (c1, c2) = _batch()
    for _ in range(2):
        model.update_target(0.99)
        out = model(v1, v2, c1, c2)
        assert set(out) == {"loss", "pixel_loss", "instance_loss", "positives"}
        assert torch.isfinite(out["loss"]) and -4.0 <= out["loss"].item() <= 4.0
        assert out["instance_loss"].item() == 0.0
        assert out["positives"].item() > 0
        assert not out["pixel_loss"].requires_grad and not out["positives"].requires_grad
        optimizer.zero_grad()
        out["loss"].backward()
        grads = [p.grad for p in model.backbone.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.backbone.get_submodule("conv1").weight.grad.abs().sum() > 0
        assert model.ppm.transform.weight.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in _target_params(model))
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimizer_ids & {id(p) for p in _target_params(model)}


def test_zero_positives_batch_is_finite():
    model = PixPro(**SMALL)
    (v1, v2), (c1, c2) = _disjoint_batch()
    out = model(v1, v2, c1, c2)
    assert out["positives"].item() == 0
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_positive_counts_for_identical_views():
    model = PixPro(**SMALL)
    v = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    assert model(v, v, box, box)["positives"].item() == 4  # 2x2 map: each cell pairs with itself


def test_coordinate_maps_match_boxes():
    model = PixPro(**SMALL)
    (v1, v2), (c1, c2) = _batch(b=2)

    def to_map(boxes: torch.Tensor, size: int = 64) -> torch.Tensor:
        t = (torch.arange(size) + 0.5) / size
        x = boxes[:, 0, None] + t[None] * (boxes[:, 2] - boxes[:, 0])[:, None]
        y = boxes[:, 1, None] + t[None] * (boxes[:, 3] - boxes[:, 1])[:, None]
        xs, ys = x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)
        return torch.stack([xs, ys, torch.ones_like(xs)], dim=1)

    from_boxes = model(v1, v2, c1, c2)["positives"]
    from_maps = model(v1, v2, to_map(c1), to_map(c2))["positives"]
    assert from_maps.item() == from_boxes.item()


def test_update_target_moves_parameters_not_buffers():
    model = PixPro(**SMALL)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
        for p in model.projector.parameters():
            p.add_(1.0)
    (v1, v2), (c1, c2) = _batch()
    model(v1, v2, c1, c2)  # updates online and target BN running stats differently
    online = [p.detach().clone() for m in (model.backbone, model.projector) for p in m.parameters()]
    target = [p.detach().clone() for p in _target_params(model)]
    assert not all(torch.equal(a, b) for a, b in zip(online, target, strict=True))
    target_buffers = [b.clone() for m in (model.target_backbone, model.target_projector) for b in m.buffers()]

    model.update_target(1.0)
    for before, p in zip(target, _target_params(model), strict=True):
        assert torch.equal(before, p)
    model.update_target(0.25)
    for o, t, p in zip(online, target, _target_params(model), strict=True):
        torch.testing.assert_close(p.detach(), 0.25 * t + 0.75 * o)
    model.update_target(0.0)
    for o, p in zip(online, _target_params(model), strict=True):
        assert torch.equal(o, p)
    after = [b for m in (model.target_backbone, model.target_projector) for b in m.buffers()]
    for before, b in zip(target_buffers, after, strict=True):
        assert torch.equal(before, b)


def test_target_stays_in_train_mode():
    model = PixPro(**SMALL).eval()
    assert not model.backbone.training and not model.projector.training
    assert all(m.training for m in model.target_backbone.modules())
    assert all(m.training for m in model.target_projector.modules())


def test_pixcontrast_with_instance_branch():
    model = PixPro(**SMALL, loss="pixcontrast", instance_weight=0.5)
    assert model.ppm is None
    (v1, v2), (c1, c2) = _batch()
    out = model(v1, v2, c1, c2)
    assert torch.isfinite(out["loss"]) and out["pixel_loss"].item() > 0
    assert -4.0 <= out["instance_loss"].item() <= 4.0 and out["instance_loss"].item() != 0.0
    torch.testing.assert_close(out["loss"].detach(), out["pixel_loss"] + 0.5 * out["instance_loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.instance_projector.parameters())
    assert all(p.grad is None for p in model.target_instance_projector.parameters())
    model.update_target(0.0)
    for o, t in zip(
        model.instance_projector.parameters(), model.target_instance_projector.parameters(), strict=True
    ):
        assert torch.equal(o, t)


def test_every_online_parameter_gets_a_gradient():
    """DDP without find_unused_parameters needs every trainable parameter in the graph."""
    for kwargs in ({}, {"loss": "pixcontrast"}, {"instance_weight": 1.0}):
        model = PixPro(**SMALL, **kwargs)
        (v1, v2), (c1, c2) = _batch()
        model(v1, v2, c1, c2)["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (kwargs, missing)


def test_online_encoder_and_bad_arguments():
    model = PixPro(**SMALL)
    assert model.online_encoder() is model.backbone
    assert "layer4.1.bn2.weight" in model.online_encoder().state_dict()
    with pytest.raises(ValueError, match="pixcontrast"):
        PixPro(**SMALL, loss="simclr")
