import math

import pytest
import torch
import torch.nn.functional as F

from pixpro.geometry import cell_geometry, positive_mask
from pixpro.losses import consistency_loss, instance_loss, pixcontrast_loss


def _mask(boxes1: torch.Tensor, boxes2: torch.Tensor, h: int = 3, w: int = 3) -> torch.Tensor:
    return positive_mask(cell_geometry(boxes1, h, w), cell_geometry(boxes2, h, w), 0.7)


def _features(b: int, c: int, h: int, w: int, requires_grad: bool = False) -> torch.Tensor:
    x = F.normalize(torch.randn(b, c, h, w), dim=1)
    return x.requires_grad_(requires_grad)


def test_identical_features_and_boxes_give_minus_four():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.7, 0.1, 0.2, 0.6]])  # square bins; 2nd flipped
    mask = _mask(boxes, boxes)
    assert torch.equal(mask, torch.eye(9).expand(2, 9, 9))
    feats = _features(2, 16, 3, 3)
    loss = consistency_loss(feats, feats, mask) + consistency_loss(feats, feats, mask.transpose(1, 2))
    torch.testing.assert_close(loss, torch.tensor(-4.0), atol=1e-5, rtol=0)


def test_no_positives_anywhere_is_zero_with_finite_grads():
    boxes1 = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.2, 0.2]])
    boxes2 = torch.tensor([[0.6, 0.6, 1.0, 1.0], [0.7, 0.5, 1.0, 0.9]])
    mask = _mask(boxes1, boxes2)
    assert mask.sum() == 0
    pred = _features(2, 16, 3, 3, requires_grad=True)
    target = _features(2, 16, 3, 3)
    loss = consistency_loss(pred, target, mask) + consistency_loss(pred, target, mask.transpose(1, 2))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_consistency_loss_matches_hand_computation():
    torch.manual_seed(1)
    pred = _features(2, 4, 1, 3).flatten(2)
    target = _features(2, 4, 1, 2).flatten(2)
    mask = torch.zeros(2, 3, 2)
    mask[0, 0, 1] = mask[0, 2, 0] = 1  # image 1 has no positives: contributes 0 to the mean
    cos_a = (pred[0, :, 0] * target[0, :, 1]).sum()
    cos_b = (pred[0, :, 2] * target[0, :, 0]).sum()
    expected = -2 * ((cos_a + cos_b) / (2 + 1e-6) + 0.0) / 2
    torch.testing.assert_close(consistency_loss(pred, target, mask), expected)


def test_consistency_loss_accepts_maps_and_flat_cells():
    pred, target = _features(2, 8, 2, 2), _features(2, 8, 2, 2)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    torch.testing.assert_close(
        consistency_loss(pred, target, mask), consistency_loss(pred.flatten(2), target.flatten(2), mask)
    )


def test_consistency_loss_is_float32_under_half_inputs():
    pred, target = _features(2, 8, 2, 2).bfloat16(), _features(2, 8, 2, 2).bfloat16()
    loss = consistency_loss(pred, target, torch.ones(2, 4, 4))
    assert loss.dtype == torch.float32


def test_instance_loss():
    z = F.normalize(torch.randn(4, 8), dim=1)
    torch.testing.assert_close(instance_loss(z, z), torch.tensor(-2.0))
    torch.testing.assert_close(instance_loss(z, -z), torch.tensor(2.0))
    p = F.normalize(torch.randn(4, 8), dim=1)
    torch.testing.assert_close(instance_loss(p, z), -2 * (p * z).sum(1).mean())


def _loop_pixcontrast(q, k, mask, tau, valid_k):
    total, count = 0.0, 0
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            positives = [j for j in range(k.shape[2]) if mask[b, i, j] > 0 and valid_k[b, j]]
            if not positives:
                continue
            sims = {
                j: math.exp(float(q[b, :, i] @ k[b, :, j]) / tau) for j in range(k.shape[2]) if valid_k[b, j]
            }
            total += -math.log(sum(sims[j] for j in positives) / sum(sims.values()))
            count += 1
    return total / max(count, 1)


def test_pixcontrast_matches_loop():
    torch.manual_seed(2)
    q = F.normalize(torch.randn(3, 8, 5, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(3, 8, 6, dtype=torch.float64), dim=1)
    mask = (torch.rand(3, 5, 6) > 0.6).double()
    mask[1] = 0  # an image without positives
    mask[0, 0, 5] = 1  # a positive on an invalid pixel must not count
    valid_k = torch.ones(3, 6, dtype=torch.bool)
    valid_k[0, 5] = False
    valid_k[2, :2] = False
    expected = _loop_pixcontrast(q, k, mask, 0.3, valid_k)
    got = pixcontrast_loss(q, k, mask, tau=0.3, valid_k=valid_k)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_pixcontrast_single_positive_is_cross_entropy():
    torch.manual_seed(3)
    q = F.normalize(torch.randn(2, 8, 4), dim=1)
    k = F.normalize(torch.randn(2, 8, 4), dim=1)
    mask = torch.eye(4).expand(2, 4, 4)
    logits = torch.einsum("bci,bcj->bij", q, k) / 0.2
    expected = F.cross_entropy(logits.reshape(8, 4), torch.arange(4).repeat(2))
    torch.testing.assert_close(pixcontrast_loss(q, k, mask, tau=0.2), expected)


def test_pixcontrast_no_positives_is_zero_with_finite_grads():
    q = F.normalize(torch.randn(2, 8, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(2, 8, 4), dim=1)
    valid_k = torch.zeros(2, 4, dtype=torch.bool)  # not even a valid key pixel
    loss = pixcontrast_loss(q, k, torch.ones(2, 4, 4), valid_k=valid_k)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(q.grad).all()
    loss = pixcontrast_loss(q, k, torch.zeros(2, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("which", ["consistency", "pixcontrast", "instance"])
def test_losses_compute_in_float32_under_bf16_autocast(which):
    """Under autocast bmm runs in bf16 even for float32 inputs (PixContrast was 2e-3 off): each loss
    turns autocast off, so under it the loss equals the fp32 loss of the same features."""
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(4, 32, 49, generator=g), dim=1)
    b = F.normalize(torch.randn(4, 32, 49, generator=g), dim=1)
    mask = (torch.rand(4, 49, 49, generator=g) > 0.7).float()
    if which == "consistency":
        run = lambda: consistency_loss(a, b, mask)  # noqa: E731
    elif which == "pixcontrast":
        run = lambda: pixcontrast_loss(a, b, mask, tau=0.3)  # noqa: E731
    else:
        run = lambda: instance_loss(a[:, :, 0], b[:, :, 0])  # noqa: E731
    reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
    assert mixed.dtype == torch.float32
    assert (mixed - reference).abs().item() <= 1e-6
