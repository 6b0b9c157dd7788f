"""Fusion found by torch.fx in ``forward`` (ResNet blocks, pre-activation blocks, functional
code), not only inside ``nn.Sequential``: exact against the member loop, visible in
``print(ens)``, only where the ``nn.Sequential`` fusion's conditions hold."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.ensemble import Ensemble
from scaleinv_kernels.ensemble.fusion import fused_count
from scaleinv_kernels.models import PreResNet, normalized_resnet
from tests.ensemble.nets import BottleneckResNet, SmallResNet
from tests.ensemble.test_classifiers import compare_with_float64


class FunctionalCNN(nn.Module):
    """Fusable chains written as function calls: an input conv → BN → F.relu →
    F.max_pool2d(2), GroupNorm → torch.relu, BN → x.relu_() → nn.MaxPool2d(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8, affine=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.gn(self.conv2(x)))
        x = self.pool(self.bn3(self.conv3(x)).relu_())
        return self.fc(torch.flatten(x, 1))


NETS = {
    # name: (factory, per-member input shape, norm chains fused in forward)
    "resnet-basic": (SmallResNet, (3, 3, 10, 10), 3),
    "resnet-bottleneck": (BottleneckResNet, (3, 3, 10, 10), 5),
    "preresnet8": (lambda: PreResNet(8, 4), (3, 3, 8, 8), 7),
    # BN → ReLU across the end of an inner nn.Sequential: the stem and each block's branch
    "normalized-resnet": (normalized_resnet, (3, 3, 8, 8), 4),
    "functional": (FunctionalCNN, (4, 1, 13, 12), 3),
}


def _count_calls(monkeypatch) -> dict[str, int]:
    from scaleinv_kernels.ensemble import norm_layers

    calls = {"bn_act_pool": 0, "gn_act_pool": 0, "conv_bn_act_pool": 0}
    for name in calls:
        real = getattr(norm_layers, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(norm_layers, name, counted)
    return calls


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net, input_grad", [(net, False) for net in NETS]
                         + [("functional", True)])  # the input conv then runs unfused
def test_fused_in_forward_matches_member_loop(net, input_grad, train, monkeypatch):
    """Each member equals that member run alone (float32 outputs and running statistics
    within 2x the float32 loop's error against float64, float64 gradients to 1e-10: see
    test_classifiers; a gradient that is ~0 in exact arithmetic holds only rounding, which
    the fused kernels' summation order changes), and the fused ops ran once per fused
    chain in each of its two passes (float32 without grad, float64 with)."""
    calls = _count_calls(monkeypatch)
    factory, shape, chains = NETS[net]
    compare_with_float64(factory, 3, shape, train=train, input_grad=input_grad)
    assert sum(calls.values()) == 2 * chains
    if net == "functional":
        assert calls["gn_act_pool"] == 2
        # an input that needs no gradient lets the input conv join the first chain
        assert calls["conv_bn_act_pool"] == (1 if input_grad else 2)


def test_print_shows_what_was_fused():
    ens = Ensemble(FunctionalCNN, 2)
    text = repr(ens)
    assert "fused in forward (torch.fx): 3 norm → ReLU" in text
    assert "fused in forward: +ReLU +MaxPool2d(2) +the conv before it" in repr(ens.net.bn1)
    assert "fused into the next BatchNorm in forward" in repr(ens.net.conv1)
    assert "fused in forward: +ReLU" in repr(ens.net.gn)
    assert "fused in forward: +ReLU +MaxPool2d(2)" in repr(ens.net.bn3)
    assert fused_count(Ensemble(SmallResNet, 2).net) == 3
    # the modules themselves are unchanged: the ReLU a BasicBlock also calls after the
    # residual add is still a ReLU, and state_dict keys are the original ones
    res = Ensemble(SmallResNet, 2)
    assert isinstance(res.net.layer1[0].relu, nn.ReLU)
    assert set(res.net.state_dict()) == set(SmallResNet().state_dict())


class NotFusable(nn.Module):
    """Chains the fused op cannot take: the norm's output used twice, ReLU6, a norm
    with momentum=None, a pool other than MaxPool2d(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4, momentum=None)
        self.bn4 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv(x))
        x = F.relu(y) + y
        x = F.relu6(self.bn2(x))
        x = F.relu(self.bn3(x))
        return F.max_pool2d(F.relu(self.bn4(x)), 3)


def test_fusion_only_where_the_fused_ops_apply(monkeypatch):
    calls = _count_calls(monkeypatch)
    ens = Ensemble(NotFusable, 2)
    assert [n for n, m in ens.net.named_modules() if getattr(m, "fused_in_forward", "")] \
        == ["bn4"]  # BN → ReLU, without the 3x3 pool
    assert "+MaxPool2d" not in repr(ens.net.bn4)
    compare_with_float64(NotFusable, 2, (3, 2, 6, 6), train=True)
    assert calls == {"bn_act_pool": 2, "gn_act_pool": 0, "conv_bn_act_pool": 0}
    assert Ensemble(SmallResNet, 2, fuse=False)._fused_forward is None
    assert fused_count(Ensemble(SmallResNet, 2, fuse=False).net) == 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        if x.shape[-1] > 3:  # shape-dependent: torch.fx cannot trace it
            return F.relu(self.bn(x))
        return F.relu(self.bn(-x))


def test_untraceable_forward_runs_unfused():
    ens = Ensemble(Untraceable, 2, check_forward=False)
    assert ens._fused_forward is None
    x = torch.randn(2, 3, 2, 4, 4)
    out = ens(x)
    for i in range(2):
        assert torch.allclose(out[i], ens.member(i)(x[i]), atol=1e-6)


def test_fused_forward_survives_pickle_and_deepcopy():
    ens = Ensemble(PreResNet(8, 4), 2).eval()
    x = torch.randn(2, 3, 3, 8, 8)
    expected = ens(x)
    for other in (pickle.loads(pickle.dumps(ens)), copy.deepcopy(ens)):
        assert other._fused_forward is not None and fused_count(other.net) == 7
        assert torch.equal(other(x), expected)


def test_torchvision_resnet18_fused_in_forward():
    """torchvision's ResNet: the stem's and every BasicBlock's BN → ReLU are fused in
    forward (its exactness: test_classifiers)."""
    tv = pytest.importorskip("torchvision")
    ens = Ensemble(lambda: tv.models.resnet18(num_classes=10), 2)
    fused = [n for n, m in ens.net.named_modules() if getattr(m, "fused_in_forward", "")]
    assert fused == ["bn1"] + [f"layer{s}.{b}.bn1" for s in range(1, 5) for b in range(2)]
