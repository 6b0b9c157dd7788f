"""theory.py: closed forms, input checks, and the equivalences they claim, checked by training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.optim import FusedSGDWD, StatsRecorder
from scaleinv_kernels.scale_invariance import freeze_last_layer
from scaleinv_kernels.theory import (
    equivalent_hparams,
    explr_alpha,
    explr_schedule,
    intrinsic_lr,
    predicted_angular_update,
    predicted_effective_lr,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_mlp(seed=0, width=32, eps=1e-30, dtype=torch.float64):
    """Scale-invariant in both trainable tensors: Linear (no bias) → BN(affine=False)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, width, bias=False),
                      nn.BatchNorm1d(width, affine=False, eps=eps, track_running_stats=False),
                      nn.ReLU(), nn.Linear(width, width, bias=False),
                      nn.BatchNorm1d(width, affine=False, eps=eps, track_running_stats=False),
                      nn.ReLU(), nn.Linear(width, 3))
    freeze_last_layer(m)
    return m.to(dtype)


def _data(n=512, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)  # random labels: the gradient noise never dies
    return x, y, g


def _trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


# ---- closed forms -----------------------------------------------------------------------
def test_intrinsic_lr_floats_and_tensors():
    assert intrinsic_lr(0.1, 5e-4) == pytest.approx(5e-5, rel=1e-15)
    out = intrinsic_lr(torch.tensor([0.1, 0.2]), torch.tensor([1e-2, 1e-3]))
    assert torch.allclose(out, torch.tensor([1e-3, 2e-4]))


def test_predicted_angular_update_values():
    assert predicted_angular_update(0.1, 1e-2, 0.9) == pytest.approx(math.sqrt(2e-3 / 1.9))
    assert predicted_angular_update(0.5, 2e-4) == pytest.approx(math.sqrt(2e-4))
    t = predicted_angular_update(torch.tensor([0.5, 2.0]), 1e-2)
    assert torch.allclose(t, torch.tensor([0.1, 0.2]))
    from scaleinv_kernels.experiments import demo  # the demo uses the same function
    assert demo.predicted_angular_update is predicted_angular_update


def test_predicted_effective_lr_formula():
    # √(2ηλ(1−μ)) / ‖∇̃L‖: √(2·0.5·0.02)/0.5 without momentum
    assert predicted_effective_lr(0.5, 0.02, unit_grad_norm=0.5) == pytest.approx(
        math.sqrt(0.02) / 0.5)
    assert predicted_effective_lr(0.1, 1e-2, 0.9, unit_grad_norm=2.0) == pytest.approx(
        math.sqrt(2e-3 * 0.1) / 2.0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: intrinsic_lr(-0.1, 1e-3), ValueError, "lr must lie in"),
    (lambda: intrinsic_lr("0.1", 1e-3), TypeError, "float or a tensor"),
    (lambda: predicted_angular_update(0.1, 1e-3, 1.0), ValueError, "momentum"),
    (lambda: predicted_angular_update(0.1, torch.tensor([1e-3, -1.0])), ValueError,
     "every element of weight_decay"),
    (lambda: predicted_effective_lr(0.1, 1e-3, unit_grad_norm=0.0), ValueError,
     "unit_grad_norm"),
    (lambda: explr_alpha(0.1, 0.1, 0.9), ValueError, "no real root"),
    (lambda: explr_schedule(0.1, 1e-3, 0.9, 2.5), TypeError, "steps must be an int"),
    (lambda: explr_schedule(0.1, 1e-3, 0.9, -1), ValueError, "steps must be >= 0"),
    (lambda: equivalent_hparams(0.1, 1e-3, 0.0), ValueError, "factor"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_explr_alpha_is_the_larger_root():
    for lr, wd, mu in ((0.1, 5e-4, 0.9), (0.1, 5e-3, 0.9), (0.3, 1e-2, 0.5)):
        a = explr_alpha(lr, wd, mu)
        b = mu / a  # the other root
        assert a * a - (1 + mu - lr * wd) * a + mu == pytest.approx(0.0, abs=1e-14)
        assert a >= b and 0 < a < 1
    assert explr_alpha(0.5, 1e-2, 0.0) == pytest.approx(1 - 5e-3, rel=1e-15)


def test_explr_schedule_values():
    s = explr_schedule(0.1, 5e-3, 0.9, 5)
    t = torch.arange(5, dtype=torch.float64)
    assert torch.allclose(s.lrs, 0.1 * s.alpha ** (-2 * t - 1), rtol=1e-14)
    assert torch.allclose(s.weight_scale, s.alpha ** -torch.arange(6.0, dtype=torch.float64))
    assert s.initial_buffer_scale == pytest.approx((s.alpha - 1) / (0.1 * s.alpha))
    w0 = torch.ones(3)
    assert torch.allclose(s.initial_momentum_buffer(w0), w0 * s.initial_buffer_scale)
    assert len(explr_schedule(0.1, 5e-3, 0.9, 0).lrs) == 0


# ---- the equivalences, by training --------------------------------------------------------
def _run_pair(momentum, steps=60, correct_buffer=True):
    lr, wd = 0.1, 5e-3
    a = _bn_mlp()
    b = copy.deepcopy(a)
    x, y, g = _data()
    xt = torch.randn(128, 10, generator=g, dtype=torch.float64)
    s = explr_schedule(lr, wd, momentum, steps)
    oa = torch.optim.SGD(_trainable(a), lr=lr, momentum=momentum, weight_decay=wd)
    ob = torch.optim.SGD(_trainable(b), lr=lr, momentum=momentum)
    if correct_buffer:
        for p in _trainable(b):
            ob.state[p]["momentum_buffer"] = s.initial_momentum_buffer(p)
    worst = 0.0
    for t in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
        ob.param_groups[0]["lr"] = float(s.lrs[t])
        oa.step()
        ob.step()
        with torch.no_grad():
            worst = max(worst, float((b(xt) - a(xt)).norm() / a(xt).norm()))
    ratios = [float(q.detach().norm() / p.detach().norm())
              for p, q in zip(_trainable(a), _trainable(b))]
    return worst, ratios, float(s.weight_scale[-1])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_explr_schedule_reproduces_weight_decay_exactly(momentum):
    worst, ratios, scale = _run_pair(momentum)
    assert worst < 1e-9
    assert scale > 1.02  # the weights really drifted apart, by the predicted factor
    for r in ratios:
        assert r == pytest.approx(scale, rel=1e-9)


def test_explr_needs_the_initial_momentum_buffer():
    worst, _, _ = _run_pair(0.9, steps=20, correct_buffer=False)
    assert worst > 1e-3


def test_equivalent_hparams_give_the_same_function_trajectory():
    e = equivalent_hparams(0.1, 4e-3, 9.0)
    assert (e.lr, e.weight_decay, e.init_scale) == pytest.approx((0.9, 4e-3 / 9, 3.0))
    assert e.intrinsic_lr == pytest.approx(4e-4)
    a = _bn_mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in _trainable(b):
            p.mul_(e.init_scale)
    oa = torch.optim.SGD(_trainable(a), lr=0.1, momentum=0.9, weight_decay=4e-3)
    ob = torch.optim.SGD(_trainable(b), lr=e.lr, momentum=0.9, weight_decay=e.weight_decay)
    x, y, g = _data()
    for _ in range(100):
        idx = torch.randint(0, len(x), (64,), generator=g)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            o.step()
    for p, q in zip(_trainable(a), _trainable(b)):
        assert torch.allclose(q, 3.0 * p, rtol=1e-9, atol=0)


@pytest.mark.parametrize("momentum, lr", [(0.0, 0.5), (0.9, 0.05)])
def test_equilibrium_predictions_match_training(momentum, lr):
    """At steady state the measured angular update and η/‖w‖² agree with the theory
    (the latter given the measured unit-norm gradient norm) within 10 % (measured: ≤ 3 %).
    ηλ/(1−μ) = 0.02, so the norms settle within ~50 of the 400 steps."""
    wd = 4e-2
    model = _bn_mlp(eps=1e-5, dtype=torch.float32)
    x, y, g = _data(n=2048, dtype=torch.float32)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=lr, momentum=momentum, weight_decay=wd)
    rec = StatsRecorder(opt)
    for _ in range(400):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    h = rec.to_numpy()
    tail = slice(-200, None)
    theta = predicted_angular_update(lr, wd, momentum)
    for k in range(len(rec.names)):
        au = h["angular_update"][tail, k].mean()
        elr = h["effective_lr"][tail, k].mean()
        unit_g = float((h["grad_norm"][tail, k] * h["weight_norm"][tail, k]).mean())
        assert au == pytest.approx(theta, rel=0.10)
        assert elr == pytest.approx(
            predicted_effective_lr(lr, wd, momentum, unit_grad_norm=unit_g), rel=0.10)
        if momentum:  # θ = η_eff‖∇̃L‖ (no √(1−μ²)) would be 2.3× off at μ = 0.9
            assert elr < 0.6 * theta / unit_g
