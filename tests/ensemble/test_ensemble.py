"""Ensemble vs a loop over its members: outputs, gradients, running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.ensemble import Ensemble, UnsupportedModuleError
from scaleinv_kernels.optim import members_of
from scaleinv_kernels.scale_invariance import normalized_cnn
from tests.ensemble.nets import BNMLP, SmallResNet
from tests.helpers import assert_bitwise, assert_rel

RTOL = 1e-5  # fp32, relative to the largest magnitude of the reference tensor


def close(actual, expected, what):
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert_rel(actual.detach(), expected.detach(), RTOL, what, atol=RTOL * scale)


def randomize_buffers(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics, so that eval mode tests something."""
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.3)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    return model


def compare_with_loop(factory, m: int, x_shape, *, train: bool, shared: bool = False,
                      conv_impl: str = "grouped", seed: int = 0, fuse: bool = True,
                      input_grad: bool = True) -> None:
    """ens(x) vs [member(i)(x[i])]: outputs, parameter grads and buffers afterwards (and
    the input's gradient with ``input_grad``; without it x is data, as a network input
    is, which lets an input-layer conv fuse into the norm after it)."""
    gen = torch.Generator().manual_seed(seed)

    def made():
        return randomize_buffers(factory(), gen)

    ens = Ensemble(made, m, init="independent", seed=seed, conv_impl=conv_impl, fuse=fuse)
    ens.train(train)
    members = [ens.member(i) for i in range(m)]  # copies taken before the ensemble runs
    x = torch.randn((m, *x_shape) if not shared else x_shape, generator=gen)
    x.requires_grad_(input_grad)
    out = ens.forward_shared(x) if shared else ens(x)
    weights = torch.randn(out.shape, generator=gen)
    (out * weights).sum().backward()
    input_grads = []
    ens_params = dict(ens.net.named_parameters())
    ens_buffers = dict(ens.net.named_buffers())
    for i, member in enumerate(members):
        xi = (x if shared else x[i]).detach().requires_grad_(input_grad)
        oi = member(xi)
        (oi * weights[i]).sum().backward()
        input_grads.append(xi.grad)
        close(out[i], oi, f"member {i} output")
        for name, p in member.named_parameters():
            q = ens_params[name]
            assert q.requires_grad == p.requires_grad, name
            if p.grad is None:
                assert q.grad is None or not q.grad[i].any(), name
                continue
            close(q.grad[i], p.grad, f"member {i} grad of {name}")
        for name, b in member.named_buffers():
            close(ens_buffers[name][i].double(), b.double(), f"member {i} buffer {name}")
    if input_grad:
        expected = sum(input_grads) if shared else torch.stack(input_grads)
        close(x.grad, expected, "input grad")


def seq(*layers):
    return lambda: nn.Sequential(*layers)


LAYERS = {
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)), (5, 3, 7, 7)),
    "conv2d-stride-dil-nobias": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2,
                                                                 dilation=2, bias=False)),
                                 (3, 4, 9, 8)),
    "conv2d-groups": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), (2, 4, 6, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=1)), (4, 3, 11)),
    "linear": (lambda: nn.Sequential(nn.Linear(7, 3)), (6, 7)),
    "linear-3d-nobias": (lambda: nn.Sequential(nn.Linear(7, 3, bias=False)), (2, 5, 7)),
    "bn2d": (lambda: nn.Sequential(nn.BatchNorm2d(3)), (4, 3, 5, 5)),
    "bn2d-noaffine": (lambda: nn.Sequential(nn.BatchNorm2d(3, affine=False)), (4, 3, 5, 5)),
    "bn2d-momentum-none": (lambda: nn.Sequential(nn.BatchNorm2d(3, momentum=None)),
                           (4, 3, 5, 5)),
    "bn2d-no-running": (lambda: nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)),
                        (4, 3, 5, 5)),
    "bn1d-2d-input": (lambda: nn.Sequential(nn.BatchNorm1d(5)), (7, 5)),
    "bn1d-3d-input": (lambda: nn.Sequential(nn.BatchNorm1d(5)), (3, 5, 4)),
    "groupnorm": (lambda: nn.Sequential(nn.GroupNorm(2, 4)), (3, 4, 5, 5)),
    "layernorm": (lambda: nn.Sequential(nn.LayerNorm([5])), (3, 4, 5)),
    "layernorm-2d-noaffine": (lambda: nn.Sequential(nn.LayerNorm([4, 5],
                                                                 elementwise_affine=False),
                                                    nn.Linear(5, 2)), (3, 4, 5)),
    "activations-pools": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.SiLU(),
        nn.AvgPool2d(2), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.0), nn.Tanh()), (3, 2, 9, 9)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_member_loop(name, train):
    factory, shape = LAYERS[name]
    compare_with_loop(factory, 3, shape, train=train)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("name", ["conv2d", "conv2d-stride-dil-nobias", "conv2d-groups",
                                  "conv1d"])
def test_conv_impls_match_member_loop(name, impl):
    factory, shape = LAYERS[name]
    compare_with_loop(factory, 4, shape, train=True, conv_impl=impl)


@pytest.mark.parametrize("name", ["conv2d", "conv2d-groups"])
def test_direct_conv_impl_matches_member_loop(name):
    factory, shape = LAYERS[name]
    compare_with_loop(factory, 4, shape, train=True, conv_impl="direct")


def test_auto_picks_direct_for_few_input_channels_on_cpu():
    ens = Ensemble(normalized_cnn, 2, init="independent", seed=0)
    convs = [mod for mod in ens.modules() if type(mod).__name__ == "MemberConv"]
    x = torch.randn(2, 3, 1, 8, 8)
    picks = [conv._pick(x.new_empty(6, conv.in_channels, 8, 8)) for conv in convs]
    assert picks == ["direct", "grouped", "grouped"]  # 1 input channel, then 16 and 32


def test_direct_conv_impl_refuses_strided_conv():
    factory, shape = LAYERS["conv2d-stride-dil-nobias"]
    ens = Ensemble(factory, 2, init="independent", seed=0, conv_impl="direct")
    with pytest.raises(ValueError, match="conv_impl='direct' needs"):
        ens(torch.randn(2, *shape))


def gn_cnn() -> nn.Module:
    """GroupNorm → ReLU (→ MaxPool2d(2)) blocks: fused into scaleinv::gn_act_pool."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.GroupNorm(3, 6), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, bias=False), nn.GroupNorm(2, 4, affine=False),
        nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net", ["cnn", "cnn-odd", "bnmlp", "resnet", "affine-bn-relu-pool",
                                 "gn-relu-pool", "cnn-groupnorm"])
def test_whole_nets_match_member_loop(net, train, fuse):
    factory, shape = {
        "cnn": (normalized_cnn, (4, 1, 12, 12)),
        "cnn-odd": (normalized_cnn, (3, 1, 11, 9)),  # odd H/W through two 2×2 pools
        "bnmlp": (BNMLP, (6, 4, 5)),
        "resnet": (SmallResNet, (3, 3, 10, 10)),
        "affine-bn-relu-pool": (lambda: nn.Sequential(
            # no conv bias before BN: its true gradient is 0, so only rounding would be compared
            nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4),
            nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3)), (5, 2, 13, 12)),
        "gn-relu-pool": (gn_cnn, (5, 2, 13, 12)),
        "cnn-groupnorm": (lambda: normalized_cnn(norm="group"), (4, 1, 12, 12)),
    }[net]
    compare_with_loop(factory, 3, shape, train=train, fuse=fuse)


def test_fusion_applies_in_sequential_only():
    ens = Ensemble(normalized_cnn, 2)
    net = ens.net
    assert net.bn1.fused_relu and net.bn1.fused_pool == 2
    assert net.bn3.fused_relu and net.bn3.fused_pool == 0  # no pool after the third block
    assert isinstance(net.relu1, nn.Identity) and isinstance(net.pool2, nn.Identity)
    assert set(ens.net.state_dict()) == set(normalized_cnn().state_dict())
    plain = Ensemble(normalized_cnn, 2, fuse=False)
    assert not plain.net.bn1.fused_relu and isinstance(plain.net.relu1, nn.ReLU)
    # blocks call their modules from forward: the modules stay unfused (the Ensemble's fx
    # pass fuses those chains in forward instead; see test_fusion.py)
    res = Ensemble(SmallResNet, 2)
    assert not any(getattr(m, "fused_relu", False) for m in res.modules())
    mom_none = Ensemble(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None),
                                              nn.ReLU()), 2)
    assert not mom_none.net[1].fused_relu
    gn = Ensemble(gn_cnn, 2).net
    assert gn[1].fused_relu and gn[1].fused_pool == 2 and gn[5].fused_relu
    assert gn[5].fused_pool == 0 and isinstance(gn[3], nn.Identity)
    assert "fused: +ReLU +MaxPool2d(2)" in repr(gn[1])


@pytest.mark.parametrize("net", ["cnn", "bnmlp", "linear", "groupnorm"])
def test_shared_batch_matches_member_loop(net):
    factory, shape = {
        "cnn": (normalized_cnn, (4, 1, 12, 12)),
        "bnmlp": (BNMLP, (6, 4, 5)),
        "linear": LAYERS["linear-3d-nobias"],
        "groupnorm": LAYERS["groupnorm"],  # normalization before any weight layer
    }[net]
    compare_with_loop(factory, 3, shape, train=True, shared=True)


def test_shared_batch_is_not_copied_per_member():
    ens = Ensemble(normalized_cnn, 5, init="independent", seed=0).eval()
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        out = ens.forward_shared(x)
    assert out.shape == (5, 4, 10)
    # the shared input reaches conv1 as is: one convolution with 5·16 output channels
    seen = []
    handle = ens.net.conv1.register_forward_hook(lambda mod, inp, o: seen.append(inp[0].shape))
    with torch.no_grad():
        ens.forward_shared(x)
    handle.remove()
    assert seen == [torch.Size([4, 1, 12, 12])]


def test_member_chunks_equal_full_run():
    gen = torch.Generator().manual_seed(3)
    ens = Ensemble(normalized_cnn, 6, init="independent", seed=1)
    x = torch.randn(6, 4, 1, 12, 12, generator=gen)
    full = ens(x)
    full.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in ens.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in ens.named_buffers()}
    ens2 = Ensemble(normalized_cnn, 6, init="independent", seed=1)
    outs = []
    for a, b in ((0, 4), (4, 6)):
        out = ens2(x[a:b], members=slice(a, b))
        out.square().sum().backward()
        outs.append(out)
    close(torch.cat(outs), full, "chunked output")
    for n, p in ens2.named_parameters():
        if n in grads:
            close(p.grad, grads[n], f"chunked grad {n}")
    for n, b in ens2.named_buffers():
        close(b.double(), buffers[n].double(), f"chunked buffer {n}")


def test_init_modes_and_seeds():
    a = Ensemble(normalized_cnn, 3, init="independent", seed=7)
    b = Ensemble(normalized_cnn, 5, init="independent", seed=7)
    c = Ensemble(normalized_cnn, 3, init="independent", seed=8)
    s = Ensemble(normalized_cnn, 3, init="shared", seed=7)
    w = lambda e: e.net.conv1.weight.detach()  # noqa: E731
    assert torch.equal(w(a), w(b)[:3])  # member i's init depends on (seed, i) only
    assert not torch.equal(w(a)[0], w(a)[1])
    assert not torch.equal(w(a), w(c))
    assert all(torch.equal(w(s)[0], w(s)[i]) for i in range(3))
    model = normalized_cnn()
    inst = Ensemble(model, 2)
    assert torch.equal(w(inst)[1], model.conv1.weight.detach())


def test_params_marked_frozen_kept_and_member_roundtrip():
    ens = Ensemble(normalized_cnn, 4, init="independent", seed=0)
    for p in ens.parameters():
        assert members_of(p) == 4 and p.shape[0] == 4
    assert not ens.net.fc.weight.requires_grad and ens.net.conv1.weight.requires_grad
    m2 = ens.member(2)
    assert type(m2) is type(normalized_cnn())
    assert not m2.fc.weight.requires_grad
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(2)
    ens.load_member(0, m2)
    assert torch.equal(ens.net.conv2.weight[0], m2.conv2.weight)
    assert torch.equal(ens.net.conv2.weight[1], ens.member(1).conv2.weight)
    assert torch.equal(ens.member(-1).conv1.weight, ens.net.conv1.weight[3])


def test_dropout_masks_independent_per_member():
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5)), 3, seed=0)
    with torch.no_grad():
        ens.net[0].weight.copy_(ens.net[0].weight[:1].expand(3, -1, -1))
        ens.net[0].bias.copy_(ens.net[0].bias[:1].expand(3, -1))
    out = ens.forward_shared(torch.randn(4, 8))
    zero = out == 0
    assert zero.float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert not torch.equal(zero[0], zero[1]) and not torch.equal(zero[1], zero[2])


class HasOwnParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


class MixesBatch(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.how = how

    def forward(self, x):
        x = self.lin(x)
        if self.how == "mean0":
            return x - x.mean(0)
        if self.how == "view":
            return x.view(-1, 2)
        return x[0]


def test_bad_input_errors():
    ens = Ensemble(normalized_cnn, 3, seed=0)
    with pytest.raises(ValueError, match=r"shape \[3, B, \.\.\.\]"):
        ens(torch.randn(2, 4, 1, 12, 12))
    with pytest.raises(ValueError, match="forward_shared"):
        ens(torch.randn(4, 1, 12, 12))
    with pytest.raises(IndexError, match="member 3 out of range for 3"):
        ens.member(3)
    with pytest.raises(TypeError, match="member index must be an int"):
        ens.member(1.0)
    with pytest.raises(ValueError, match=r"Linear: expected input \[N, \.\.\., 32\]"):
        Ensemble(lambda: nn.Sequential(nn.Flatten(), nn.Linear(32, 2)), 2)(
            torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="selects no member"):
        ens(torch.randn(0, 4, 1, 12, 12), members=slice(3, 5))
    with pytest.raises(TypeError, match="expected a Sequential, got Linear"):
        ens.load_member(0, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_members must be a positive int"):
        Ensemble(normalized_cnn, 0)
    with pytest.raises(ValueError, match="needs a factory"):
        Ensemble(normalized_cnn(), 2, init="independent")
    widths = iter([8, 8, 9])
    with pytest.raises(ValueError, match="different architecture for member 2"):
        Ensemble(lambda: nn.Linear(4, next(widths)), 3, init="independent")
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(LSTM\).*supported modules"):
        Ensemble(lambda: nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3)), 2)
    with pytest.raises(UnsupportedModuleError, match=r"'<root>' \(HasOwnParam\) holds \['scale'"):
        Ensemble(HasOwnParam, 2)
    with pytest.raises(UnsupportedModuleError, match="method 'mean'.*dim 0"):
        Ensemble(lambda: MixesBatch("mean0"), 2)
    with pytest.raises(UnsupportedModuleError, match="method 'view'.*x.size\\(0\\)"):
        Ensemble(lambda: MixesBatch("view"), 2)
    with pytest.raises(UnsupportedModuleError, match="indexes the batch"):
        Ensemble(lambda: MixesBatch("index"), 2)
    with pytest.raises(UnsupportedModuleError, match="Flatten\\(start_dim=0\\)"):
        Ensemble(lambda: nn.Sequential(nn.Linear(3, 3), nn.Flatten(0)), 2)


def test_batch_major_input_equals_member_major():
    gen = torch.Generator().manual_seed(5)
    ens = Ensemble(normalized_cnn, 3, init="independent", seed=2)
    x = torch.randn(3, 4, 1, 12, 12, generator=gen)
    a = ens(x)
    b = ens(x.transpose(0, 1).contiguous(), batch_major=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[B, 3, \.\.\.\]"):
        ens(x, batch_major=True)


@pytest.mark.parametrize("shared", [False, True], ids=["own-batches", "shared-batch"])
def test_direct_grads_equal_autograd_grads(shared):
    """direct_grads=True writes each chunk's gradient into its rows of p.grad: bitwise the
    gradients autograd accumulates through the sliced parameters."""
    ens = Ensemble(normalized_cnn, 6, init="independent", seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 1, 12, 12, generator=gen)
    y = torch.randint(0, 10, (6, 5), generator=gen)

    def grads(direct: bool) -> dict[str, torch.Tensor]:
        ens.zero_grad(set_to_none=True)
        for a in range(0, 6, 4):
            b = min(6, a + 4)
            out = (ens.forward_shared(x[0], members=slice(a, b), direct_grads=direct)
                   if shared else ens(x[a:b], members=slice(a, b), direct_grads=direct))
            yy = y[a:b].reshape(-1)
            F.cross_entropy(out.reshape(-1, 10), yy, reduction="none").view(
                b - a, 5).mean(1).sum().backward()
        return {n: p.grad.clone() for n, p in ens.named_parameters() if p.requires_grad}

    plain, direct = grads(False), grads(True)
    assert plain.keys() == direct.keys() and len(plain) == 3
    for name in plain:
        assert_bitwise(direct[name], plain[name], name)
    frozen = [p for p in ens.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_direct_grads_only_for_member_ranges_in_grad_mode():
    ens = Ensemble(normalized_cnn, 3, init="independent", seed=0)
    x = torch.randn(3, 2, 1, 8, 8)
    ens(x, direct_grads=True).sum().backward()  # all members: ordinary autograd
    assert ens._ctx.leaves is None
    with torch.no_grad():
        ens(x[:2], members=slice(0, 2), direct_grads=True)
    assert ens._ctx.leaves is None
    assert all(p.grad is not None for p in ens.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ensemble_runs_fusable_layers_unfused(dtype):
    """bn_act_pool covers float32/float64: in bf16/fp16 the fused layers run torch's
    BN → ReLU → max-pool, so fuse=True and fuse=False give the same bits."""
    outs, grads = [], []
    for fuse in (True, False):
        ens = Ensemble(normalized_cnn, 2, init="independent", seed=0, fuse=fuse).to(dtype)
        x = torch.randn(2, 3, 1, 12, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
        out = ens(x)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in ens.parameters() if p.requires_grad])
    assert outs[0].dtype == dtype
    assert_bitwise(outs[0], outs[1], "output")
    for a, b in zip(*grads):
        assert_bitwise(a, b, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_groupnorm_ensemble(dtype):
    """gn_act_pool covers float32/float64: in bf16/fp16 the fused GroupNorm layers run
    torch's GroupNorm → ReLU → max-pool on the [B, m·C] view (affine inside group_norm,
    so not bitwise the unfused per-member affine): equal within the dtype's rounding."""
    outs = []
    for fuse in (True, False):
        ens = Ensemble(gn_cnn, 2, init="independent", seed=0, fuse=fuse).to(dtype)
        x = torch.randn(2, 3, 2, 13, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
        outs.append(ens(x))
    assert outs[0].dtype == dtype
    assert_rel(outs[0].float(), outs[1].float(), 0.0, "bf16/fp16 fused vs unfused",
               atol=0.02 * float(outs[1].detach().float().abs().max()))


@pytest.mark.parametrize("retain", [True, False])
def test_retain_cpu_memory_applies_at_the_first_cpu_call(monkeypatch, retain):
    from scaleinv_kernels.ensemble import ensemble as ensemble_module

    calls = []
    monkeypatch.setattr(ensemble_module, "retain_freed_memory", lambda: calls.append(1))
    ens = Ensemble(normalized_cnn, 2, init="independent", seed=0, retain_cpu_memory=retain)
    assert calls == []  # building changes nothing
    ens(torch.randn(2, 3, 1, 8, 8))
    ens.forward_shared(torch.randn(3, 1, 8, 8))
    assert len(calls) == (2 if retain else 0)


CONV_FUSED_NETS = {
    "cnn": (normalized_cnn, (4, 1, 12, 12)),
    "cnn-odd": (normalized_cnn, (3, 1, 11, 9)),  # odd conv output: a dropped row and column
    "rgb-affine": (lambda: nn.Sequential(  # 3 input channels (27 taps), affine BN, 5x5 next
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4),
        nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), (5, 3, 13, 12)),
    "grey-5x5-nopad": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 5, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 4 * 3, 2)), (4, 1, 12, 11)),
}


def _count_fused_conv_calls(monkeypatch) -> list[int]:
    from scaleinv_kernels.ensemble import norm_layers

    calls = [0]
    real = norm_layers.conv_bn_act_pool

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(norm_layers, "conv_bn_act_pool", counted)
    return calls


@pytest.mark.parametrize("shared", [False, True], ids=["own-batch", "shared-batch"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net", list(CONV_FUSED_NETS))
def test_input_conv_fused_into_norm_matches_member_loop(net, train, shared, monkeypatch):
    """Conv → BN → ReLU → MaxPool2d(2) on a network input that needs no gradient runs as
    ONE scaleinv::conv_bn_act_pool, and the ensemble still equals the member loop
    (outputs, every parameter gradient, running statistics)."""
    calls = _count_fused_conv_calls(monkeypatch)
    factory, shape = CONV_FUSED_NETS[net]
    compare_with_loop(factory, 3, shape, train=train, shared=shared, input_grad=False,
                      conv_impl="auto")
    assert calls[0] == 1


def test_input_conv_fusion_only_where_it_applies(monkeypatch):
    calls = _count_fused_conv_calls(monkeypatch)
    ens = Ensemble(normalized_cnn, 2, init="independent", seed=0)
    net = ens.net
    assert net.conv1.fused_norm is net.bn1 and net.bn1.fused_conv is net.conv1
    assert net.conv2.fused_norm is None  # 16 input channels: not an input layer
    assert net.conv3.fused_norm is None  # no pool after the third block
    assert "fused into the next BatchNorm" in repr(net.conv1)
    assert set(net.state_dict()) == set(normalized_cnn().state_dict())
    x = torch.randn(2, 4, 1, 8, 8)
    ens(x)
    assert calls[0] == 1
    ens(x.requires_grad_())  # the fused op computes no input gradient: unfused call
    assert calls[0] == 1
    with torch.no_grad():
        ens(x)
    assert calls[0] == 2
    for kwargs in ({"fuse": False}, {"conv_impl": "direct"}):
        other = Ensemble(normalized_cnn, 2, **kwargs).net
        assert other.conv1.fused_norm is None and other.bn1.fused_conv is None
    biased = Ensemble(lambda: nn.Sequential(nn.Conv2d(1, 2, 3, bias=True), nn.BatchNorm2d(2),
                                            nn.ReLU(), nn.MaxPool2d(2)), 2).net
    assert biased[0].fused_norm is None
