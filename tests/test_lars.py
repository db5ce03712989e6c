import copy
import functools
from typing import Any

import torch
from torch import nn

from pixpro.builder import PixPro
from pixpro.lars import LARS, lars_param_groups
from pixpro.model import Projector, build_backbone
from tests.support.host_syncs import HostSyncCounter
from tests.support.lars_reference import OpCounter, reference_lars_step


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


# --- the foreach step against the per-parameter loop ---------------------------------------------

NO_GRAD = {"backbone.conv1.weight", "backbone.bn1.bias"}  # grad None at every step: never any state
LATE_NO_GRAD = "backbone.layer4.1.conv2.weight"  # grad None from step 3 on: has state, is skipped
ZERO_GRAD = "backbone.layer1.0.conv2.weight"
ZERO_WEIGHT = "backbone.layer2.0.conv1.weight"


@functools.cache
def _built_model() -> PixPro:
    torch.manual_seed(0)
    model = PixPro(backbone="resnet18", projector_hidden=64, projector_out=32)
    with torch.no_grad():
        model.get_parameter(ZERO_WEIGHT).zero_()
    return model


def _real_model() -> PixPro:
    """A fresh copy of a resnet18 PixPro with an adapted weight of zero norm (the zero-init residual
    BN gammas are 1-D zeros as well)."""
    return copy.deepcopy(_built_model())


def _set_grads(step: int, *models: nn.Module) -> None:
    """Seeded random gradients for every trainable parameter, the same in each model, except the
    edge cases above."""
    gen = torch.Generator().manual_seed(100 + step)
    named = [dict(m.named_parameters()) for m in models]
    for name, p in named[0].items():
        if not p.requires_grad:
            continue
        if name in NO_GRAD or (name == LATE_NO_GRAD and step >= 3):
            grad = None
        elif name == ZERO_GRAD:
            grad = torch.zeros_like(p)
        else:
            grad = torch.empty_like(p).uniform_(-0.1, 0.1, generator=gen)
        for params in named:
            params[name].grad = None if grad is None else grad.clone()


def _assert_same(model_a: nn.Module, opt_a: LARS, model_b: nn.Module, opt_b: LARS) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert (a in opt_a.state) == (b in opt_b.state), name
        if a in opt_a.state:
            buf_a, buf_b = opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"]
            assert torch.equal(buf_a, buf_b), name


def _pair(wd: float = 1e-2, lr: float = 0.5) -> tuple[nn.Module, LARS, nn.Module, LARS]:
    model = _real_model()
    ref = copy.deepcopy(model)
    return (
        model,
        LARS(lars_param_groups(model, wd), lr=lr),
        ref,
        LARS(lars_param_groups(ref, wd), lr=lr),
    )


def test_foreach_step_is_bitwise_the_per_parameter_loop():
    model, opt, ref, ref_opt = _pair()
    names = dict(model.named_parameters())
    for step in range(5):
        _set_grads(step, model, ref)
        grads_before = {n: p.grad.clone() for n, p in names.items() if p.grad is not None}
        opt.step()
        reference_lars_step(ref_opt)
        _assert_same(model, opt, ref, ref_opt)
        for n, g in grads_before.items():  # p.grad is read, never scaled in place
            assert torch.equal(names[n].grad, g), n
    assert all(names[n] not in opt.state for n in NO_GRAD)
    assert names[LATE_NO_GRAD] in opt.state
    assert names[ZERO_WEIGHT].abs().sum() > 0  # it moved: the unadapted first step


def test_foreach_step_without_weight_decay_both_groups_adapted():
    """wd = 0: the step scales copies of the gradients, not ``p.grad``; a zero gradient stays zero, so
    ``||g|| = 0`` is met (with decay it is not), as is ``||w|| = 0`` in the adapted 1-D zero-init
    residual gammas."""
    model, opt, ref, ref_opt = _pair(wd=0.0)
    for o in (opt, ref_opt):
        o.param_groups[1]["lars_adapt"] = True
    names = dict(model.named_parameters())
    for step in range(3):
        _set_grads(step, model, ref)
        grads_before = {n: p.grad.clone() for n, p in names.items() if p.grad is not None}
        opt.step()
        reference_lars_step(ref_opt)
        _assert_same(model, opt, ref, ref_opt)
        for n, g in grads_before.items():
            assert torch.equal(names[n].grad, g), n


def test_mixed_dtypes_in_one_group():
    torch.manual_seed(0)
    params = [
        nn.Parameter(torch.randn(4, 3)),
        nn.Parameter(torch.randn(5, 2, dtype=torch.float64)),
        nn.Parameter(torch.randn(6, 2)),
        nn.Parameter(torch.randn(3, 3, dtype=torch.float64)),
    ]
    refs = [nn.Parameter(p.detach().clone()) for p in params]
    opt = LARS(params, lr=0.3, weight_decay=1e-2)
    ref_opt = LARS(refs, lr=0.3, weight_decay=1e-2)
    for _ in range(3):
        for p, r in zip(params, refs, strict=True):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        opt.step()
        reference_lars_step(ref_opt)
        for p, r in zip(params, refs, strict=True):
            assert p.dtype == r.dtype and torch.equal(p, r)
            assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"])


def test_state_dict_after_two_steps_resumes_exactly():
    """Saved after 2 steps and loaded into a fresh LARS: the same as never stopping. Also a state
    saved by the per-parameter loop (the previous implementation's checkpoints) resumes exactly."""
    model, opt, ref, ref_opt = _pair()
    for step in range(2):
        _set_grads(step, model, ref)
        opt.step()
        reference_lars_step(ref_opt)
    saved = [
        (copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict()))
        for m, o in ((model, opt), (ref, ref_opt))
    ]

    resumed = []
    for model_state, opt_state in saved:
        m = _real_model()
        m.load_state_dict(model_state)
        o = LARS(lars_param_groups(m, 1e-2), lr=0.5)
        o.load_state_dict(opt_state)
        resumed.append((m, o))
    for step in range(2, 5):
        for m, o in [(model, opt), *resumed]:
            _set_grads(step, m)
            o.step()
    for m, o in resumed:
        _assert_same(model, opt, m, o)


def test_step_makes_no_host_sync():
    model, opt, _, _ = _pair()
    for step in range(3):  # the first step (buffers created) and later ones
        _set_grads(step, model)
        with HostSyncCounter() as counter:
            opt.step()
        assert counter.count == 0, dict(counter.ops)


def _ops_per_step(model: nn.Module, step: Any) -> int:
    _set_grads(0, model)
    step()  # buffers are created on the first step
    with OpCounter() as counter:
        step()
    return counter.aten_ops()


def test_ops_per_step_do_not_grow_with_the_number_of_parameters():
    """Per step a fixed number of ops per param group (per device and dtype), not per tensor: what
    sets the kernel launches on a GPU. resnet18 PixPro: 68 tensors in 2 groups, 21 ops (the loop:
    462)."""
    model, opt, ref, ref_opt = _pair()
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    foreach_ops = _ops_per_step(model, opt.step)
    loop_ops = _ops_per_step(ref, lambda: reference_lars_step(ref_opt))
    assert n_params > 60 and len(opt.param_groups) == 2
    assert foreach_ops <= 30 and loop_ops > 5 * n_params

    small = _small_net()
    small_opt = LARS(lars_param_groups(small, 1e-2), lr=0.5)
    for p in small.parameters():
        p.grad = torch.randn_like(p)
    small_opt.step()
    with OpCounter() as counter:
        small_opt.step()
    assert counter.aten_ops() == foreach_ops  # 6 tensors or 68: the same ops
