import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pixpro.model import PixelPropagation, Predictor, Projector, build_backbone, propagate


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", 512),
        ("resnet50", 2048),
        ("regnet_y_400mf", 440),
        ("convnext_tiny", 768),
        ("mobilenet_v3_small", 576),
        ("efficientnet_b0", 1280),
        ("swin_t", 768),  # channels-last inside: must still come out as [B, C, h, w]
    ],
)
def test_backbone_returns_last_feature_map(name, channels):
    backbone, c = build_backbone(name)
    assert c == channels
    x = torch.randn(2, 3, 64, 64)
    out = backbone(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, channels, 2, 2)
    backbone.eval()
    assert backbone(x).shape == (2, channels, 2, 2)


def test_backbone_keys_are_torchvision_keys_minus_classifier():
    backbone, _ = build_backbone("resnet50")
    reference = torchvision.models.resnet50(weights=None).state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert list(backbone.state_dict()) == list(expected)
    assert "conv1.weight" in expected and "layer4.2.bn3.weight" in expected
    backbone.load_state_dict(expected, strict=True)
    assert torch.equal(backbone.state_dict()["layer4.2.conv3.weight"], expected["layer4.2.conv3.weight"])


def test_non_resnet_keys_are_torchvision_keys_minus_classifier():
    backbone, _ = build_backbone("regnet_y_400mf")
    reference = torchvision.models.regnet_y_400mf(weights=None).state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert list(backbone.state_dict()) == list(expected)
    backbone.load_state_dict(expected, strict=True)


def test_resnet_last_bn_gamma_is_zero():
    backbone, _ = build_backbone("resnet50")
    bn3 = {k: v for k, v in backbone.state_dict().items() if k.endswith("bn3.weight")}
    assert len(bn3) == 16
    assert all(torch.all(v == 0) for v in bn3.values())
    assert torch.all(backbone.state_dict()["bn1.weight"] == 1)
    plain, _ = build_backbone("resnet18", zero_init_residual=False)
    assert torch.all(plain.state_dict()["layer1.0.bn2.weight"] == 1)
    basic, _ = build_backbone("resnet18")
    assert torch.all(basic.state_dict()["layer1.0.bn2.weight"] == 0)


def test_regnet_residual_branch_last_bn_gamma_is_zero():
    backbone, _ = build_backbone("regnet_y_400mf")
    state = backbone.state_dict()
    last = [k for k in state if k.endswith(".f.c.1.weight")]
    assert last
    assert all(torch.all(state[k] == 0) for k in last)
    assert torch.all(state["trunk_output.block1.block1-0.f.a.1.weight"] == 1)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_inverted_residual_last_bn_gamma_is_zero(name):
    state = build_backbone(name)[0].state_dict()
    reference = torchvision.models.get_model(name, weights=None)
    blocks = [(n, m) for n, m in reference.named_modules() if getattr(m, "use_res_connect", False)]
    assert blocks
    for block_name, block in blocks:
        norms = [n for n, m in block.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert torch.all(state[f"{block_name}.{norms[-1]}.weight"] == 0)
        assert torch.all(state[f"{block_name}.{norms[0]}.weight"] == 1)


def test_unknown_backbone_raises_one_line_with_examples():
    with pytest.raises(ValueError, match="resnet50") as info:
        build_backbone("resnet51")
    assert "\n" not in str(info.value)


def test_backbone_without_feature_map_raises():
    with pytest.raises(ValueError, match="feature map"):
        build_backbone("vit_b_16")


def test_backbone_deepcopy_and_syncbn_conversion_keep_keys():
    backbone, _ = build_backbone("resnet18")
    clone = copy.deepcopy(backbone)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(clone(x), backbone(x))
    clone.eval()
    assert clone(x).shape == (2, 512, 2, 2)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(backbone))
    assert isinstance(synced.get_submodule("layer4.1.bn2"), torch.nn.SyncBatchNorm)
    assert list(synced.state_dict()) == list(backbone.state_dict())


def test_projector_and_predictor_shapes():
    projector = Projector(32, 64, 16)
    assert projector(torch.randn(2, 32, 3, 3)).shape == (2, 16, 3, 3)
    assert [type(m) for m in projector] == [
        torch.nn.Conv2d,
        torch.nn.BatchNorm2d,
        torch.nn.ReLU,
        torch.nn.Conv2d,
    ]
    assert projector[0].bias is not None and projector[3].bias is not None
    predictor = Predictor()
    assert predictor[0].in_channels == 256 and predictor[0].out_channels == 4096
    assert predictor[3].out_channels == 256


def _loop_propagation(x: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_i = sum_j max(cos(x_i, x_j), 0)^gamma v_j, one cell pair at a time."""
    b, _, h, w = x.shape
    xs, vs = x.flatten(2), v.flatten(2)
    n = h * w
    y = torch.zeros_like(vs)
    for bi in range(b):
        for i in range(n):
            for j in range(n):
                cos = torch.dot(xs[bi, :, i], xs[bi, :, j]) / (xs[bi, :, i].norm() * xs[bi, :, j].norm())
                y[bi, :, i] += max(cos.item(), 0.0) ** gamma * vs[bi, :, j]
    return y.view_as(v)


@pytest.mark.parametrize(("layers", "gamma"), [(1, 2.0), (0, 1.0), (2, 3.0)])
def test_ppm_matches_double_loop(layers, gamma):
    torch.manual_seed(0)
    ppm = PixelPropagation(dim=8, gamma=gamma, layers=layers).double().eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        g = ppm.transform(x)
        v = g / g.norm(dim=1, keepdim=True)
        expected = _loop_propagation(x, v, gamma)
        torch.testing.assert_close(propagate(x, v, gamma), expected, atol=1e-6, rtol=0)
        out = ppm(x)
    torch.testing.assert_close(out, expected / expected.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 3, 3, dtype=torch.float64))


def test_ppm_negative_similarities_are_clamped():
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64).view(1, 1, 1, 2)  # opposite cells
    v = torch.tensor([[1.0, 10.0]], dtype=torch.float64).view(1, 1, 1, 2)
    torch.testing.assert_close(propagate(x, v, 2.0), v)


def test_ppm_rejects_bad_layer_count():
    with pytest.raises(ValueError, match="0, 1 or 2"):
        PixelPropagation(8, layers=3)


def test_ppm_gradients_are_finite():
    ppm = PixelPropagation(dim=8)
    x = torch.randn(2, 8, 2, 2, requires_grad=True)
    F.normalize(ppm(x), dim=1).sum().backward()
    assert torch.isfinite(x.grad).all()
