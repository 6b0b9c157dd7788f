"""Real classifiers in an ensemble: each member of the ensemble equals that member run
alone, in train and eval mode, judged against float64 copies of the members.

torchvision's resnet18, mobilenet_v2 and squeezenet1_1 run where torchvision loads (the
newest-torch leg; the default leg's torch 2.13.0+cpu wheel cannot load its compiled
ops); small copies of their blocks (BasicBlock, Bottleneck, InvertedResidual with
depthwise convolutions and ReLU6, Fire with channel concatenation), written as
torchvision writes them, run everywhere, as does this package's PreResNet32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from scaleinv_kernels.ensemble import Ensemble
from scaleinv_kernels.models import PreResNet, pre_resnet32
from tests.ensemble.nets import (
    BottleneckResNet,
    SmallMobileNetV2,
    SmallResNet,
    SmallSqueezeNet,
)
from tests.ensemble.test_ensemble import randomize_buffers
from tests.helpers import assert_close, assert_rel

# Float32: the ensemble's error against the float64 member may be at most RATIO times the
# float32 member loop's error (both round in float32, in different orders; train-mode
# BatchNorm over small batches amplifies rounding alike in both), plus FLOOR times the
# largest entry (8 float32 ulps) for entries the loop happens to get exactly. Judged on
# outputs and running statistics, continuous functions of the weights. Gradients are
# not: a ReLU whose input lies within rounding of 0 flips its derivative, which moves a
# whole channel's gradient through the next BatchNorm (measured: PreResNet8 at 32x32,
# one flipped element of 65 536 changed member 1's gradients by 1e-3 relative in the
# float32 ensemble, not in the float32 loop). So gradients are compared in float64 —
# the ensemble converted to float64 runs the same layers and kernels — where rounding
# (1e-16) is too small to flip one, to GRAD_RTOL of the largest entry (float64 rounding
# amplified by BatchNorm's 1/sigma over a few layers).
RATIO = 2.0
FLOOR = 2.0 ** -20
GRAD_RTOL = 1e-10


def _err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return float((value.detach().double() - ref.detach()).abs().max())


def _check(what: str, ens_value, loop_value, ref) -> None:
    e_ens, e_loop = _err(ens_value, ref), _err(loop_value, ref)
    bound = RATIO * e_loop + FLOOR * float(ref.detach().abs().max())
    assert e_ens <= bound, (f"{what}: ensemble error {e_ens:.3g} > {RATIO} x loop error "
                            f"{e_loop:.3g} + floor (bound {bound:.3g})")


def compare_with_float64(factory, m: int, x_shape, *, train: bool, seed: int = 0,
                         input_grad: bool = False, conv_impl: str = "auto") -> None:
    """Float32: ens(x) and the running statistics after it vs each member run alone in
    float32 and in float64. Float64: the ensemble's outputs and parameter gradients (and
    the input's, with ``input_grad``) vs the float64 members'."""
    gen = torch.Generator().manual_seed(seed)

    def made():
        return randomize_buffers(factory(), gen)

    ens = Ensemble(made, m, init="independent", seed=seed, conv_impl=conv_impl)
    ens.train(train)
    ens64 = copy.deepcopy(ens).double()
    members = [ens.member(i) for i in range(m)]  # taken before the ensemble runs
    x = torch.randn((m, *x_shape), generator=gen)
    with torch.no_grad():
        out = ens(x)
        buffers = dict(ens.net.named_buffers())
        for i, member in enumerate(members):
            m32, m64 = copy.deepcopy(member), copy.deepcopy(member).double()
            _check(f"member {i} output", out[i], m32(x[i]), m64(x[i].double()))
            b32 = dict(m32.named_buffers())
            for name, b in m64.named_buffers():
                if b.is_floating_point():
                    _check(f"member {i} buffer {name}", buffers[name][i], b32[name], b)
                else:
                    assert torch.equal(buffers[name][i], b32[name]), name
    members64 = [copy.deepcopy(m32).double() for m32 in members]  # = ens64's members
    x64 = x.double().requires_grad_(input_grad)
    out = ens64(x64)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    params = dict(ens64.net.named_parameters())
    for i, m64 in enumerate(members64):
        xi = x[i].double().requires_grad_(input_grad)
        o = m64(xi)
        (o * weights[i]).sum().backward()
        if input_grad:
            assert_close(x64.grad[i], xi.grad, f"float64 member {i} input grad", GRAD_RTOL)
        assert_close(out[i], o, f"float64 member {i} output", GRAD_RTOL)
        # judged against the largest gradient entry of the member: some gradients are 0
        # in exact arithmetic (a BatchNorm bias before a train-mode BatchNorm) and hold
        # rounding only
        grads = {name: p.grad for name, p in m64.named_parameters() if p.grad is not None}
        scale = max(float(g.abs().max()) for g in grads.values())
        for name, g in grads.items():
            assert_rel(params[name].grad[i], g, 0.0, f"float64 member {i} grad of {name}",
                       atol=GRAD_RTOL * scale)


OWN = {
    "resnet-basic": (SmallResNet, (4, 3, 16, 16)),
    "resnet-bottleneck": (BottleneckResNet, (4, 3, 16, 16)),
    "mobilenet-v2": (SmallMobileNetV2, (4, 3, 16, 16)),
    "squeezenet": (SmallSqueezeNet, (4, 3, 33, 33)),
    "preresnet8": (lambda: PreResNet(8, 8), (4, 3, 16, 16)),
    "preresnet32": (pre_resnet32, (4, 3, 16, 16)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net", list(OWN))
def test_classifier_blocks_match_float64_members(net, train):
    factory, shape = OWN[net]
    compare_with_float64(factory, 2, shape, train=train)


def _torchvision():
    return pytest.importorskip("torchvision")


TORCHVISION = {
    # dropout=0: dropout masks are per-member streams by design (test_random_streams),
    # not the member's global-RNG masks, so the comparison runs without them
    "resnet18": (lambda tv: tv.models.resnet18(num_classes=10), (4, 3, 64, 64)),
    "mobilenet_v2": (lambda tv: tv.models.mobilenet_v2(num_classes=10, dropout=0.0),
                     (4, 3, 64, 64)),
    "squeezenet1_1": (lambda tv: tv.models.squeezenet1_1(num_classes=10, dropout=0.0),
                      (4, 3, 64, 64)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net", list(TORCHVISION))
def test_torchvision_classifiers_match_float64_members(net, train):
    tv = _torchvision()
    build, shape = TORCHVISION[net]
    compare_with_float64(lambda: build(tv), 2, shape, train=train)


def test_preresnet_shape_and_bad_arguments():
    model = pre_resnet32()
    assert sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules()) == 33
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        PreResNet(30)
    with pytest.raises(ValueError, match="width"):
        PreResNet(8, 0)
