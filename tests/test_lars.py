import copy

import torch
from torch import nn

from pixpro.lars import LARS, lars_param_groups
from pixpro.model import Projector, build_backbone


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    )


def test_groups_split_by_ndim_including_syncbn():
    backbone, channels = build_backbone("resnet18")
    model = nn.Sequential(backbone, Projector(channels, 32, 16))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sync_bns = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync_bns) > 10

    adapted, plain = lars_param_groups(model, weight_decay=1e-5)
    assert adapted["weight_decay"] == 1e-5 and adapted["lars_adapt"] is True
    assert plain["weight_decay"] == 0.0 and plain["lars_adapt"] is False
    plain_ids = {id(p) for p in plain["params"]}
    adapted_ids = {id(p) for p in adapted["params"]}
    for bn in sync_bns:
        assert id(bn.weight) in plain_ids and id(bn.bias) in plain_ids
    for p in model.parameters():
        assert (id(p) in plain_ids) == (p.ndim < 2)
        assert (id(p) in adapted_ids) == (p.ndim >= 2)
    assert len(plain_ids) + len(adapted_ids) == len(list(model.parameters()))

    optimizer = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    for group in optimizer.param_groups:
        if group["lars_adapt"]:
            assert group["weight_decay"] == 1e-5
        else:
            assert group["weight_decay"] == 0.0
            assert all(p.ndim == 1 for p in group["params"])


def test_frozen_parameters_are_left_out():
    net = _small_net()
    net[0].requires_grad_(False)
    groups = lars_param_groups(net, 1e-4)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(net[0].weight) not in ids and id(net[0].bias) not in ids
    assert id(net[4].weight) in ids


def test_two_steps_match_hand_computation():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr, wd, m, trust = 0.5, 0.01, 0.9, 0.001
    optimizer = LARS(
        [
            {"params": [w], "weight_decay": wd, "lars_adapt": True},
            {"params": [b], "weight_decay": 0.0, "lars_adapt": False},
        ],
        lr=lr,
    )
    grads = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)) for _ in range(2)]

    ew, eb, buf_w, buf_b = w0.clone(), b0.clone(), torch.zeros_like(w0), torch.zeros_like(b0)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        optimizer.step()
        dw = gw + wd * ew
        dw = dw * (trust * ew.norm() / (dw.norm() + 1e-8))
        buf_w = m * buf_w + dw
        ew = ew - lr * buf_w
        buf_b = m * buf_b + gb  # no decay, no adaptation
        eb = eb - lr * buf_b
        torch.testing.assert_close(w.detach(), ew, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.detach(), eb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], buf_w, rtol=1e-12, atol=1e-12)


def test_zero_weight_or_zero_grad_is_not_adapted():
    w = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    optimizer.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))  # ||w|| = 0: plain SGD step
    v = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([v], lr=1.0, momentum=0.0)
    v.grad = torch.zeros(2, 2)
    optimizer.step()
    torch.testing.assert_close(v.detach(), torch.ones(2, 2))


def _train(net: nn.Module, optimizer: LARS, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()


def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 6, 6) for _ in range(6)]
    net = _small_net()
    optimizer = LARS(lars_param_groups(net, 1e-4), lr=0.2)
    _train(net, optimizer, batches[:3])
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(net, optimizer, batches[3:])

    resumed = _small_net()
    resumed.load_state_dict(saved_net)
    resumed_opt = LARS(lars_param_groups(resumed, 1e-4), lr=0.2)
    resumed_opt.load_state_dict(saved_opt)
    assert all("momentum_buffer" in resumed_opt.state[p] for p in resumed.parameters())
    _train(resumed, resumed_opt, batches[3:])
    for a, b in zip(net.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
