"""scaleinv::conv_bn_act_pool — fused conv → BatchNorm → ReLU → MaxPool2d(2) against torch.

The C++ op (through the autograd-registered layer :func:`conv_bn_act_pool`) must equal the
unfused layers ``F.conv2d → F.batch_norm → relu → max_pool2d`` in output, running
statistics and the gradients of conv_weight, weight and bias (float32: within 1e-5 of the
largest magnitude; float64: gradcheck and 1e-12); its raw outputs (statistics, window
index, patch moments) and raw backward must equal the contract in torch ops
(``conv_bn_act_pool_torch`` / ``conv_bn_act_pool_backward_torch``), and
``patch_moments`` a brute-force construction of the patches. The CUDA forward's Triton
part (marked ``triton``) runs on ``tests.devices.TRITON_DEVICE``: compiled on CUDA, else
interpreted on CPU tensors.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scaleinv_kernels.ops import conv_norm_act as cna
from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool, conv_bn_act_pool_reference
from tests.devices import TRITON_DEVICE
from tests.helpers import assert_bitwise, assert_close, assert_rel

MOMENTUM, EPS = 0.1, 1e-5

# (N, groups, C_in, C_out per group, H, W, KH, KW, ph, pw) -> conv output Hc x Wc
CASES = [
    (4, 3, 1, 4, 7, 5, 3, 3, 1, 1),  # 7x5: the pool drops a row and a column
    (1, 4, 1, 1, 6, 6, 3, 3, 1, 1),  # N=1, C_out=1
    (2, 1, 3, 5, 8, 9, 3, 3, 1, 1),  # groups=1, RGB (K=27); 8x9
    (3, 2, 3, 3, 5, 6, 1, 1, 0, 0),  # 1x1 kernel
    (2, 2, 1, 4, 9, 8, 5, 5, 2, 1),  # 5x5 kernel, 9x6
    (2, 3, 1, 3, 7, 6, 3, 1, 1, 0),  # rectangular 3x1, 7x6
    (2, 2, 2, 3, 6, 7, 1, 3, 0, 2),  # rectangular 1x3, 6x9
    (2, 2, 1, 3, 5, 37, 3, 3, 1, 1),  # 37 columns: 18 windows a row (two 16-lane steps)
    (1, 1, 3, 2, 4, 70, 3, 3, 0, 1),  # 2x70 output: one window row, 35 windows (3 steps)
    (2, 4, 3, 2, 6, 5, 3, 3, 1, 1),  # groups=4 with C_in=3
    (2, 2, 2, 3, 7, 7, 4, 4, 2, 1),  # K = 32 taps (the limit), even kernel: 8x6
    (3, 2, 1, 4, 6, 7, 3, 3, 0, 0),  # no padding: 4x5
    (2, 1, 1, 3, 3, 3, 3, 3, 2, 2),  # full padding (kernel - 1): 5x5 from 3x3
    (8, 4, 1, 16, 28, 28, 3, 3, 1, 1),  # the ensemble's real input layer (4 grey members)
]


def _case_id(case):
    n, g, ci, co, h, w, kh, kw, ph, pw = case
    return f"n{n}g{g}ci{ci}co{co}-{h}x{w}-k{kh}x{kw}-p{ph}{pw}"


def _make(case, affine, dtype=torch.float32, seed=0):
    """x, conv_weight, weight, bias, running_mean, running_var, groups, padding."""
    n, g, ci, co, h, w, kh, kw, ph, pw = case
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = (torch.randn(n, g * ci, h, w, **f64) + 0.3).to(dtype)
    cw = (torch.randn(g * co, ci, kh, kw, **f64) / (ci * kh * kw) ** 0.5).to(dtype)
    c = g * co
    wt = (torch.rand(c, **f64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, **f64).to(dtype) if affine else None
    rm = (torch.randn(c, **f64) * 0.2).to(dtype)
    rv = (torch.rand(c, **f64) + 0.5).to(dtype)
    return x, cw, wt, b, rm, rv, g, [ph, pw]


def _unfused(x, cw, groups, padding, w, b, rm, rv, *, training, momentum=MOMENTUM, eps=EPS,
             relu=True):
    """The layers the op replaces, written out here (independent of the package)."""
    y = F.conv2d(x, cw, None, 1, tuple(padding), 1, groups)
    y = F.batch_norm(y, rm, rv, w, b, training or rm is None, momentum, eps)
    return F.max_pool2d(F.relu(y) if relu else y, 2)


def _run(fn, x, cw, groups, padding, w, b, rm, rv, go_seed=1, **kw):
    """Forward + backward of ``fn`` on fresh leaves (conv_weight, weight, bias); returns
    (out, running_mean, running_var, grads)."""
    leaves = [t.clone().requires_grad_() for t in (cw, w, b) if t is not None]
    affine = leaves[1:] if w is not None else [None, None]
    stats = [None if t is None else t.clone() for t in (rm, rv)]
    y = fn(x, leaves[0], groups, padding, *affine, *stats, **kw)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(go_seed),
                     dtype=torch.float64).to(y.dtype)
    return y, stats[0], stats[1], torch.autograd.grad(y, leaves, go)


def _compare(got, ref, what, rtol=1e-5):
    names = ("out", "running_mean", "running_var")
    for name, g, r in zip(names, got[:3], ref[:3]):
        if r is None:
            assert g is None, f"{what} {name}"
        else:
            assert_close(g, r, f"{what} {name}", rtol=rtol)
    for name, g, r in zip(("grad conv_weight", "grad weight", "grad bias"), got[3], ref[3]):
        assert_close(g, r, f"{what} {name}", rtol=rtol)


# ---- the layer against the unfused layers ---------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_unfused_float32(case, relu, affine, training):
    x, cw, w, b, rm, rv, groups, padding = _make(case, affine, seed=CASES.index(case))
    kw = dict(training=training, momentum=MOMENTUM, eps=EPS, relu=relu)
    got = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv, **kw)
    ref = _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw)
    _compare(got, ref, _case_id(case))
    if not training:
        assert_bitwise(got[1], rm, "running_mean changed in eval")
        assert_bitwise(got[2], rv, "running_var changed in eval")


@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)], ids=str)
def test_every_padding(kernel):
    kh, kw = kernel
    for ph, pw in itertools.product(range(kh), range(kw)):
        case = (3, 2, 1, 3, 5, 6, kh, kw, ph, pw)
        x, cw, w, b, rm, rv, groups, padding = _make(case, True, seed=ph * 7 + pw)
        for training in (True, False):
            kw_ = dict(training=training, momentum=MOMENTUM, eps=EPS)
            got = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv, **kw_)
            ref = _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw_)
            _compare(got, ref, f"{_case_id(case)} train={training}")


def test_reference_is_the_unfused_layers():
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[0], True)
    for training in (True, False):
        kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
        got = _run(conv_bn_act_pool_reference, x, cw, groups, padding, w, b, rm, rv, **kw)
        ref = _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw)
        for g, r in zip((got[0], got[1], got[2], *got[3]), (ref[0], ref[1], ref[2], *ref[3])):
            assert_bitwise(g, r, f"reference train={training}")


def test_no_running_stats_uses_batch_stats_and_int_padding():
    x, cw, w, b, _, _, groups, _ = _make(CASES[0], True)
    for training in (True, False):
        kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
        got = _run(conv_bn_act_pool, x, cw, groups, 1, w, b, None, None, **kw)
        ref = _run(_unfused, x, cw, groups, (1, 1), w, b, None, None, **kw)
        _compare(got, ref, f"no running stats, train={training}")


@pytest.mark.parametrize("given", ["weight", "bias", "conv_weight"])
def test_partial_gradients(given):
    """Only some leaves require grad (the C++ autograd's needs_input_grad indices count only
    the tensors passed: a bias without a weight sits where the weight would)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, 7, generator=gen)
    cw = torch.randn(8, 2, 3, 3, generator=gen)
    p = torch.rand(8, generator=gen) + 0.5
    w, b = (p, None) if given == "weight" else (None, p) if given == "bias" else (None, None)
    leaf = {"weight": w, "bias": b, "conv_weight": cw}[given]
    leaf.requires_grad_()
    go = torch.randn(3, 8, 3, 2, generator=gen)  # conv output 6x5
    args = (x, cw, 2, (1, 0), w, b, None, None)
    (got,) = torch.autograd.grad(conv_bn_act_pool(*args, training=True), leaf, go)
    (want,) = torch.autograd.grad(_unfused(*args, training=True), leaf, go)
    assert_close(got, want, f"grad {given}")


def test_noncontiguous_input():
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[2], True)
    kw = dict(training=True, momentum=MOMENTUM, eps=EPS)
    ref = _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw)
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
    wide[..., ::2] = x
    for xs in (x.to(memory_format=torch.channels_last), wide[..., ::2],
               cw.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)):
        if xs.shape == cw.shape:  # a non-contiguous conv_weight
            got = _run(conv_bn_act_pool, x, xs, groups, padding, w, b, rm, rv, **kw)
        else:
            assert not xs.is_contiguous()
            got = _run(conv_bn_act_pool, xs, cw, groups, padding, w, b, rm, rv, **kw)
        _compare(got, ref, "non-contiguous")


def test_ties_route_like_torch():
    """Integer inputs and filters: y is exact, with many ties (and a constant plane: every
    window a 4-way tie); the index is max_pool2d's and the gradients go where torch's go."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (3, 2, 6, 7), generator=gen).float()
    x[1, 1] = 2.0
    cw = torch.randint(-1, 2, (4, 1, 3, 3), generator=gen).float()
    cw[:, 0, 1, 1] = 1.0  # no all-zero filter
    for training in (True, False):
        rm, rv = torch.full((4,), 0.5), torch.full((4,), 2.0)
        kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
        got = _run(conv_bn_act_pool, x, cw, 2, [1, 1], None, None, rm, rv, **kw)
        ref = _run(_unfused, x, cw, 2, [1, 1], None, None, rm, rv, **kw)
        _compare(got, ref, f"ties train={training}")
        mean, invstd = (None, None) if training else (rm, rv.add(EPS).rsqrt())
        index = torch.ops.scaleinv.conv_bn_act_pool(x, cw, 2, [1, 1], None, None, mean,
                                                    invstd, EPS, True)[3]
        y = F.relu(F.batch_norm(F.conv2d(x, cw, None, 1, 1, 1, 2), rm.clone(), rv.clone(),
                                None, None, training, MOMENTUM, EPS))
        _, flat = F.max_pool2d(y, 2, return_indices=True)
        assert_bitwise(index, ((flat // 7) % 2 * 2 + flat % 7 % 2).to(torch.uint8),
                       f"index vs max_pool2d, train={training}")


def test_runs_the_reference_without_the_extension(monkeypatch):
    """Without the compiled library the layer is the reference (logged once), with the
    same checks: running statistics updated as the op's path updates them, x refused."""
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[0], True)
    kw = dict(training=True, momentum=MOMENTUM, eps=EPS)
    fused = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv, **kw)
    monkeypatch.setattr(cna, "extension_loaded", lambda: False)
    fallback = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv, **kw)
    _compare(fallback, _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw), "fallback")
    _compare(fallback, fused, "fallback vs op")
    with pytest.raises(ValueError, match="x requires grad"):
        conv_bn_act_pool(x.clone().requires_grad_(), cw, groups, padding, w, b, None, None,
                         training=True)


# ---- float64 ------------------------------------------------------------------------


def test_float64_gradcheck_and_reference():
    for case in (CASES[0], CASES[4]):
        x, cw, w, b, rm, rv, groups, padding = _make(case, True, dtype=torch.float64)
        for training in (True, False):
            kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
            got = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv, **kw)
            ref = _run(_unfused, x, cw, groups, padding, w, b, rm, rv, **kw)
            _compare(got, ref, f"float64 {_case_id(case)} train={training}", rtol=1e-12)
    x, cw, w, b, rm, rv, groups, padding = _make((2, 2, 1, 2, 5, 4, 3, 3, 1, 1), True,
                                                 dtype=torch.float64)
    for training in (True, False):
        args = tuple(t.clone().requires_grad_() for t in (cw, w, b))
        assert torch.autograd.gradcheck(
            lambda cw_, w_, b_, t=training: conv_bn_act_pool(
                x, cw_, groups, padding, w_, b_, rm.clone(), rv.clone(), training=t,
                momentum=MOMENTUM, eps=EPS), args)


# ---- a mean far from zero in standard deviations ----------------------------------


def _offset_case(noise, seed=0):
    """x = 100 + noise·N(0, 1) and filters with a clearly nonzero sum: the conv output's
    |mean|/std is about 100·|Σw|/(noise·‖w‖) ≈ 300/noise in every channel."""
    gen = torch.Generator().manual_seed(seed)
    x = (100 + noise * torch.randn(8, 2, 28, 28, generator=gen, dtype=torch.float64)).float()
    cw = torch.randn(8, 1, 3, 3, generator=gen) * 0.05 + 0.2
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    return x, cw, w, b


@pytest.mark.parametrize("noise", [1.0, 0.1, 0.01], ids=str)
def test_statistics_of_a_far_offset_channel(noise):
    """Batch statistics come from float64 patch moments (E[y²] − mean² in float64): with
    |mean|/std up to ~3e4 the cancellation costs ~(3e4)²·2⁻⁵³ ≈ 1e-7 relative in var, so
    save_mean/save_invstd are float64's values rounded to float32 (≤ 2e-7 relative; a
    float32 accumulation would be wrong in every digit at this offset)."""
    x, cw, w, b = _offset_case(noise)
    _, sm, si, _, _ = torch.ops.scaleinv.conv_bn_act_pool(x, cw, 2, [0, 0], w, b, None, None,
                                                          EPS, True)
    y = F.conv2d(x.double(), cw.double(), None, 1, 0, 1, 2)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert float((mean.abs() / var.sqrt()).min()) > 250 / noise  # the case is what it says
    assert_rel(sm, mean, 2e-7, "save_mean")
    assert_rel(si, (var + EPS).rsqrt(), 2e-7, "save_invstd")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("noise", [1.0, 0.1], ids=str)
def test_far_offset_matches_float64_unfused(noise, training):
    """Output and gradients of the float32 op against the unfused layers in float64.

    Tolerance: any float32 implementation rounds y ≈ 100·Σw to 2⁻²⁴·|y|, about
    |mean|/std·2⁻²⁴ ≈ 2e-5/noise standard deviations, which is the error of out (and of
    x̂ in the backward); grad conv_weight sums dy·x with x ≈ 100 while Σ dy ≈ 0 and
    amplifies it by another ~100/noise. The unfused layers in float32 have exactly these
    errors (measured against float64: out 1.6e-5 / 1.3e-4 at noise 1 / 0.1, grad
    conv_weight in training 1.6e-3 / 0.19), so no float32 kernel can do better than them:
    the op must be within 2× of their error (+1e-6 where the offset costs nothing, e.g.
    grad bias), per quantity. What breaks it is an error that grows faster with the offset
    than float32's own, e.g. statistics or the backward's (G W_c − mean·S) and
    (A_c − s1/cnt·S) formed in float32. The running statistics (float64 moments; float64
    in F.batch_norm) must be within 1e-6."""
    x, cw, w, b = _offset_case(noise, seed=1)
    rm = 100 * cw.sum((1, 2, 3)).double()
    rv = cw.square().sum((1, 2, 3)).double() * noise**2
    kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
    ref = _run(_unfused, x.double(), cw.double(), 2, [0, 0], w.double(), b.double(), rm, rv,
               **kw)
    got = _run(conv_bn_act_pool, x, cw, 2, [0, 0], w, b, rm.float(), rv.float(), **kw)
    eager = _run(_unfused, x, cw, 2, [0, 0], w, b, rm.float(), rv.float(), **kw)

    def rel(a, e):
        a, e = a.detach().double(), e.detach()
        return float((a - e).abs().max() / e.abs().max())

    names = ("out", "running_mean", "running_var", "grad conv_weight", "grad weight",
             "grad bias")
    for name, g, e, r in zip(names, (*got[:3], *got[3]), (*eager[:3], *eager[3]),
                             (*ref[:3], *ref[3])):
        limit = 1e-6 if name.startswith("running") else 2 * rel(e, r) + 1e-6
        assert rel(g, r) <= limit, f"{name}: {rel(g, r):.3g} > {limit:.3g} (float32 " \
                                   f"unfused: {rel(e, r):.3g})"


# ---- moments ------------------------------------------------------------------------


def _brute_moments(x, kh, kw, groups, padding):
    """The patches built tap by tap from shifted views of the padded input, then
    Σ p pᵀ and Σ p by explicit products (float64)."""
    n, cg, h, w = x.shape
    ci = cg // groups
    ph, pw = padding
    xp = F.pad(x.double(), (pw, pw, ph, ph)).view(n, groups, ci, h + 2 * ph, w + 2 * pw)
    hc, wc = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    taps = [xp[:, :, c, ky:ky + hc, kx:kx + wc]
            for c in range(ci) for ky in range(kh) for kx in range(kw)]
    p = torch.stack(taps, 2).permute(1, 2, 0, 3, 4).reshape(groups, len(taps), -1)
    gram = (p.unsqueeze(2) * p.unsqueeze(1)).sum(-1)
    return torch.cat([gram, p.sum(-1, keepdim=True)], 2)


# grey 3x3 moments take the lag kernel (csrc/conv_norm_act.cpp, lag_moments_3x3): with
# padding, without (CASES[11]), with full padding, at its least height Hc = 2, and the
# real input layer; the others the tap-pair kernels
MOMENT_CASES = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[6], CASES[10], CASES[11],
                CASES[12], CASES[13], (2, 2, 1, 3, 4, 9, 3, 3, 0, 1)]


@pytest.mark.parametrize("case", MOMENT_CASES, ids=_case_id)
def test_patch_moments_match_brute_force(case):
    n, g, ci, co, h, w, kh, kw, ph, pw = case
    gen = torch.Generator().manual_seed(2)
    # small integers: every product and sum is exact in float64, so any order agrees
    xi = torch.randint(-4, 5, (n, g * ci, h, w), generator=gen).float()
    want = _brute_moments(xi, kh, kw, g, [ph, pw])
    assert want.shape == (g, ci * kh * kw, ci * kh * kw + 1)
    assert_bitwise(cna.patch_moments(xi, (kh, kw), g, [ph, pw]), want, "patch_moments")
    # one sample of one group at a time: the chunked path
    assert_bitwise(cna.patch_moments(xi, (kh, kw), g, [ph, pw], chunk_bytes=1), want,
                   "patch_moments chunked")
    cw = torch.randn(g * co, ci, kh, kw, generator=gen)
    got = torch.ops.scaleinv.conv_bn_act_pool(xi, cw, g, [ph, pw], None, None, None, None,
                                              EPS, True)[4]
    assert_bitwise(got, want, "the op's moments (integer input)")
    # random float32 input: products are exact in float64, only the summation order
    # differs (relative error ~ 1e-16 * number of terms)
    x = torch.randn(n, g * ci, h, w, generator=gen)
    want = _brute_moments(x, kh, kw, g, [ph, pw])
    assert_close(cna.patch_moments(x, (kh, kw), g, [ph, pw]), want, "patch_moments",
                 rtol=1e-13)
    got = torch.ops.scaleinv.conv_bn_act_pool(x, cw, g, [ph, pw], None, None, None, None,
                                              EPS, True)[4]
    assert got.dtype == torch.float64
    assert_close(got, want, "the op's moments", rtol=1e-13)


def test_eval_moments_are_empty_and_empty_batch():
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[0], True)
    invstd = rv.add(EPS).rsqrt()
    res = torch.ops.scaleinv.conv_bn_act_pool(x, cw, groups, padding, w, b, rm, invstd, EPS,
                                              True)
    assert res[4].shape == (0,) and res[4].dtype == torch.float64
    assert_bitwise(res[1], rm, "eval save_mean")
    assert_bitwise(res[2], invstd, "eval save_invstd")
    # N = 0 in eval: empty outputs, zero gradients; in training: an error, nothing changed
    x0 = x[:0]
    res = torch.ops.scaleinv.conv_bn_act_pool(x0, cw, groups, padding, w, b, rm, invstd, EPS,
                                              True)
    assert res[0].shape == (0, 12, 3, 2) and res[3].shape == (0, 12, 3, 2)
    assert res[3].dtype == torch.uint8 and res[4].shape == (0,)
    got = _run(conv_bn_act_pool, x0, cw, groups, padding, w, b, rm, rv, training=False)
    assert got[0].shape == (0, 12, 3, 2)
    for g in got[3]:
        assert_bitwise(g, torch.zeros_like(g), "N=0 gradient")
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_bn_act_pool(x0, cw, groups, padding, w, b, rm0, rv0, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.scaleinv.conv_bn_act_pool(x0, cw, groups, padding, w, b, None, None, EPS,
                                            True)
    assert_bitwise(rm0, rm, "running_mean after a refused call")
    assert_bitwise(rv0, rv, "running_var after a refused call")


# ---- raw op against the contract in torch ops ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7], CASES[10], CASES[13]],
                         ids=_case_id)
def test_raw_op_matches_torch_contract(case, training, relu, dtype):
    x, cw, w, b, rm, rv, groups, padding = _make(case, True, dtype=dtype, seed=7)
    mean, invstd = (None, None) if training else (rm, rv.add(EPS).rsqrt())
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    got = torch.ops.scaleinv.conv_bn_act_pool(x, cw, groups, padding, w, b, mean, invstd, EPS,
                                              relu)
    ref = cna.conv_bn_act_pool_torch(x, cw, groups, padding, w, b, mean, invstd, EPS, relu)
    for name, g, r in zip(("out", "save_mean", "save_invstd"), got, ref):
        assert g.dtype == dtype, name
        assert_close(g, r, name, rtol=rtol)
    assert_bitwise(got[3], ref[3], "index")
    assert_bitwise(got[4].isnan(), torch.zeros_like(got[4], dtype=torch.bool), "moments NaN")
    assert_close(got[4], ref[4], "moments", rtol=1e-13)
    gen = torch.Generator().manual_seed(5)
    go = torch.randn(got[0].shape, generator=gen, dtype=torch.float64).to(dtype)
    for mask in ([True, True, True], [True, False, False], [False, True, False],
                 [False, False, True], [False, False, False]):
        args = (go, x, cw, groups, padding, w, got[1], got[2], got[0], got[3], got[4],
                training, relu, mask)
        res = torch.ops.scaleinv.conv_bn_act_pool_backward(*args)
        exp = cna.conv_bn_act_pool_backward_torch(*args)
        for name, g, r, m in zip(("grad conv_weight", "grad weight", "grad bias"), res, exp,
                                 mask):
            assert (g is None) == (not m) == (r is None), f"{name} with mask {mask}"
            if m:
                assert g.dtype == dtype and g.shape == r.shape, name
                assert_close(g, r, f"{name} mask {mask}", rtol=rtol)
    # without a weight there is no grad_weight, whatever the mask says
    res = torch.ops.scaleinv.conv_bn_act_pool_backward(
        go, x, cw, groups, padding, None, got[1], got[2], got[0], got[3], got[4], training,
        relu, [True, True, True])
    assert res[0] is not None and res[1] is None and res[2] is not None


@pytest.fixture
def fp32_convolutions():
    """cuDNN convolutions in full float32 for the test: by default torch lets them round
    their inputs to TF32 (``torch.backends.cudnn.allow_tf32``), a global setting of the
    user's, not part of the op, that would put errors of ~1e-3 into y. No effect on CPU."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_path_with_triton_bn_matches_torch_contract(training, fp32_convolutions):
    """The CUDA implementation (materialised y, the Triton bn_act_pool forward) on
    TRITON_DEVICE against the torch contract on CPU."""
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[0], True, seed=9)
    mean, invstd = (None, None) if training else (rm, rv.add(EPS).rsqrt())
    args = (x, cw, groups, padding, w, b, mean, invstd, EPS, True)
    dev = [t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) else t for t in args]
    got = [t.cpu() for t in cna.conv_bn_act_pool_triton(*dev)]  # the CUDA forward with triton
    ref = cna.conv_bn_act_pool_torch(*args)
    for name, g, r in zip(("out", "save_mean", "save_invstd", "index", "moments"), got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_close(g, r, f"triton path {name}")
    assert_bitwise(got[3], ref[3], "triton path index")


# ---- bad input ----------------------------------------------------------------------


def _bad_input_cases():
    x, cw, w, b, rm, rv, groups, padding = _make((2, 2, 1, 3, 6, 6, 3, 3, 1, 1), True)
    base = dict(x=x, cw=cw, groups=groups, padding=padding, w=w, b=b, rm=rm, rv=rv,
                training=True)
    cases = [
        (dict(x=x.int()), TypeError, "float32 or float64"),
        (dict(x=x.double()), TypeError, "conv_weight must have x's dtype"),
        (dict(cw=cw.double()), TypeError, "conv_weight must have x's dtype"),
        (dict(b=b.double()), TypeError, "bias must have x's dtype"),
        (dict(padding=[3, 1]), ValueError, "padding must be in"),
        (dict(padding=[1, -1]), ValueError, "padding must be in"),
        (dict(padding=[1]), ValueError, "2 entries"),
        (dict(padding="same"), TypeError, "padding must be an int or 2 ints"),
        (dict(groups=2.0), TypeError, "groups must be an int"),
        (dict(x=torch.randn(2, 3, 6, 6)), ValueError, "do not fit groups"),
        (dict(cw=torch.randn(5, 1, 3, 3), w=None, b=None), ValueError, "do not fit groups"),
        (dict(x=torch.randn(2, 4, 8, 8), cw=torch.randn(6, 2, 5, 5), padding=[2, 2],
              w=None, b=None), ValueError, "50 taps, at most 32"),
        (dict(x=torch.randn(2, 2, 3, 8), padding=[0, 1]), ValueError,
         "output 1x8 is smaller than the 2x2 pool"),
        (dict(x=torch.randn(2, 2, 6, 2), padding=[1, 0]), ValueError,
         "smaller than the kernel"),
        (dict(x=x[0]), ValueError, r"\[N, C, H, W\]"),
        (dict(w=w[:4]), ValueError, r"weight must have shape \[C\] = \[6\]"),
        (dict(b=b[:, None]), ValueError, r"bias must have shape \[C\]"),
        (dict(rv=None), ValueError, "both running_mean and running_var"),
        (dict(rv=rv[:3], training=False), ValueError, r"running_var must have shape \[C\]"),
        (dict(rm=rm[:3], training=False), ValueError, r"mean must have shape \[C\]"),
        (dict(x=x.clone().requires_grad_()), ValueError, "x requires grad"),
    ]
    return base, cases


def test_bad_input_raises_and_changes_nothing():
    base, cases = _bad_input_cases()
    for change, error, text in cases:
        a = {**base, **change}
        rm, rv = base["rm"].clone(), base["rv"].clone()
        a["rm"] = rm if a["rm"] is base["rm"] else a["rm"]
        a["rv"] = rv if a["rv"] is base["rv"] else a["rv"]
        saved = [t.clone() for t in (a["rm"], a["rv"]) if t is not None]
        with pytest.raises(error, match=text):
            conv_bn_act_pool(a["x"], a["cw"], a["groups"], a["padding"], a["w"], a["b"],
                             a["rm"], a["rv"], training=a["training"])
        for before, after in zip(saved, [t for t in (a["rm"], a["rv"]) if t is not None]):
            assert_bitwise(after, before, f"running stats after {text!r}")
    # the valid call the cases were derived from runs
    conv_bn_act_pool(base["x"], base["cw"], base["groups"], base["padding"], base["w"],
                     base["b"], base["rm"].clone(), base["rv"].clone(), training=True)


def test_op_checks_name_the_problem():
    """The op itself (the C++ checks, and the Python contract's) refuses the same input."""
    x, cw, w, b, rm, rv, groups, padding = _make((2, 2, 1, 3, 6, 6, 3, 3, 1, 1), True)
    invstd = rv.add(EPS).rsqrt()
    bad = [
        ((x.double(), cw, groups, padding, w, b, None, None), TypeError, "dtype"),
        ((x.half(), cw.half(), groups, padding, None, None, None, None), TypeError,
         "float32 or float64"),
        ((x, cw, groups, [3, 1], w, b, None, None), ValueError, "padding"),
        ((torch.randn(2, 4, 8, 8), torch.randn(6, 2, 5, 5), groups, [2, 2], None, None, None,
          None), ValueError, "at most 32"),
        ((x[:, :, :3], cw, groups, [0, 1], w, b, None, None), ValueError,
         "smaller than the 2x2 pool"),
        ((x, cw, groups, padding, w[:4], b, None, None), ValueError,
         r"weight must have shape \[C\]"),
        ((x, cw, groups, padding, w, b, rm, None), ValueError, "both mean and invstd"),
        ((x, cw, groups, padding, w, b, None, invstd), ValueError, "both mean and invstd"),
    ]
    for args, error, text in bad:
        for fn in (torch.ops.scaleinv.conv_bn_act_pool, cna.conv_bn_act_pool_torch):
            with pytest.raises(error, match=text):
                fn(*args, EPS, True)
    with pytest.raises(ValueError, match="x requires grad"):
        torch.ops.scaleinv.conv_bn_act_pool(x.clone().requires_grad_(), cw, groups, padding,
                                            w, b, None, None, EPS, True)
    out, sm, si, idx, mom = torch.ops.scaleinv.conv_bn_act_pool(x, cw, groups, padding, w, b,
                                                                None, None, EPS, True)
    for fn in (torch.ops.scaleinv.conv_bn_act_pool_backward,
               cna.conv_bn_act_pool_backward_torch):
        with pytest.raises(ValueError, match="grad_out"):
            fn(out[:, :, :1], x, cw, groups, padding, w, sm, si, out, idx, mom, True, True,
               [True, True, True])
        with pytest.raises(ValueError, match="moments"):
            fn(out, x, cw, groups, padding, w, sm, si, out, idx, mom[:, :3], True, True,
               [True, True, True])


# ---- opcheck, determinism, other kernel builds ----------------------------------------

OPCHECK_ARGS = [  # case, affine, eval, relu
    (CASES[0], True, False, True),
    (CASES[0], False, True, True),
    (CASES[5], True, True, False),
    (CASES[2], False, False, False),
]


@pytest.mark.parametrize("args", OPCHECK_ARGS, ids=str)
def test_opcheck_cpu(args):
    case, affine, eval_mode, relu = args
    x, cw, w, b, rm, rv, groups, padding = _make(case, affine)
    cw.requires_grad_()
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    mean, invstd = (rm, rv.add(EPS).rsqrt()) if eval_mode else (None, None)
    torch.library.opcheck(torch.ops.scaleinv.conv_bn_act_pool.default,
                          (x, cw, groups, padding, w, b, mean, invstd, EPS, relu))
    cw = cw.detach()
    w, b = (w.detach(), b.detach()) if affine else (None, None)
    out, sm, si, idx, mom = torch.ops.scaleinv.conv_bn_act_pool(x, cw, groups, padding, w, b,
                                                                mean, invstd, EPS, relu)
    go = torch.randn_like(out)
    # the backward op has no autograd of its own
    torch.library.opcheck(torch.ops.scaleinv.conv_bn_act_pool_backward.default,
                          (go, x, cw, groups, padding, w, sm, si, out, idx, mom, not eval_mode,
                           relu, [True, affine, True]))


def test_deterministic_across_calls_and_thread_counts():
    x, cw, w, b, rm, rv, groups, padding = _make(CASES[13], True)
    runs = []
    saved = torch.get_num_threads()
    try:
        for threads in (saved, saved, 1):
            torch.set_num_threads(threads)
            got = _run(conv_bn_act_pool, x, cw, groups, padding, w, b, rm, rv,
                       training=True)
            raw = torch.ops.scaleinv.conv_bn_act_pool(x, cw, groups, padding, w, b, None,
                                                      None, EPS, True)
            runs.append((got[0], got[1], got[2], *got[3], *raw))
    finally:
        torch.set_num_threads(saved)
    for again in runs[1:]:
        for a, e in zip(again, runs[0]):
            assert_bitwise(a, e, "repeated call")


def test_a_member_does_not_depend_on_the_members_beside_it():
    """Ensemble members are groups: the first members' outputs, statistics, moments and
    gradients are bitwise the same whether 16, 4 or 2 groups share the call (N = 70: the
    moments are summed over several chunks of samples), so an ensemble's result does not
    depend on how its members are chunked or sharded."""
    x, cw, w, b, rm, rv, groups, padding = _make((70, 16, 1, 3, 10, 9, 3, 3, 1, 1), True)
    co = 3
    go = torch.randn(70, 16 * co, 5, 4, generator=torch.Generator().manual_seed(5))
    runs = []
    for g in (16, 4, 2):
        c = g * co
        leaves = [t[:c].clone().requires_grad_() for t in (cw, w, b)]
        stats = [rm[:c].clone(), rv[:c].clone()]
        y = conv_bn_act_pool(x[:, :g], leaves[0], g, padding, *leaves[1:], *stats,
                             training=True)
        grads = torch.autograd.grad(y, leaves, go[:, :c])
        raw = torch.ops.scaleinv.conv_bn_act_pool(x[:, :g].contiguous(), cw[:c], g, padding,
                                                  w[:c], b[:c], None, None, EPS, True)
        runs.append([y[:, :2 * co], *(t[:2 * co] for t in (*stats, *grads)), raw[4][:2]])
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            assert_bitwise(a, e, "the first two members, fewer members beside them")


BUILD_SCRIPT = r"""
import torch
import torch.nn.functional as F
from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool
worst = 0.0
# (N, groups, C_in, C_out, H, W, KH, KW, ph, pw): odd, RGB, 5x5, wide, the real layer
for n, g, ci, co, h, w, kh, kw, ph, pw in [(4, 3, 1, 4, 7, 5, 3, 3, 1, 1),
                                          (2, 1, 3, 5, 8, 9, 3, 3, 1, 1),
                                          (2, 2, 1, 4, 9, 8, 5, 5, 2, 1),
                                          (2, 2, 1, 3, 5, 37, 3, 1, 1, 0),
                                          (8, 4, 1, 16, 28, 28, 3, 3, 1, 1)]:
    gen = torch.Generator().manual_seed(n * h + w)
    x = torch.randn(n, g * ci, h, w, generator=gen)
    cw0 = torch.randn(g * co, ci, kh, kw, generator=gen)
    w0, b0 = torch.rand(g * co, generator=gen) + 0.5, torch.randn(g * co, generator=gen)
    for training in (True, False):
        res = []
        for fused in (True, False):
            cw, wt, b = (t.clone().requires_grad_() for t in (cw0, w0, b0))
            rm, rv = torch.zeros(g * co), torch.ones(g * co)
            if fused:
                y = conv_bn_act_pool(x, cw, g, (ph, pw), wt, b, rm, rv, training=training)
            else:
                z = F.conv2d(x, cw, None, 1, (ph, pw), 1, g)
                y = F.max_pool2d(F.relu(F.batch_norm(z, rm, rv, wt, b, training)), 2)
            go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            res.append((y, rm, rv, *torch.autograd.grad(y, (cw, wt, b), go)))
        for a, e in zip(*res):
            worst = max(worst, float((a - e).detach().abs().max() / e.detach().abs().max()))
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


@pytest.mark.parametrize("setting", ["SCALEINV_NO_AVX512=1", "ATEN_CPU_CAPABILITY=default",
                                     "ATEN_CPU_CAPABILITY=avx2"])
def test_other_kernel_paths_match_unfused(setting):
    """Read once per process, so each runs in a fresh one. SCALEINV_NO_AVX512=1: the
    portable C++ loops that machines without AVX-512 use instead of the intrinsics kernels;
    ATEN_CPU_CAPABILITY: the portable (no FMA) and AVX2 builds of the kernel file."""
    key, value = setting.split("=")
    run = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env={**os.environ, key: value},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    used, worst = run.stdout.strip().splitlines()[-1].split()
    if key == "ATEN_CPU_CAPABILITY":
        assert used.lower() == value
    assert float(worst) <= 1e-5, f"{setting}: worst relative difference {worst}"


ACROSS_BUILDS_SCRIPT = r"""
import sys
import torch
import scaleinv_kernels  # noqa: F401 (registers the ops)
out = []
for x, cw, wt, b, mean, invstd, go, g, pad in torch.load(sys.argv[1]):
    for training in (True, False):
        m, s = (None, None) if training else (mean, invstd)
        res = torch.ops.scaleinv.conv_bn_act_pool(x, cw, g, pad, wt, b, m, s, 1e-5, True)
        grads = torch.ops.scaleinv.conv_bn_act_pool_backward(
            go, x, cw, g, pad, wt, res[1], res[2], res[0], res[3], res[4], training, True,
            [True, True, True])
        out.append((list(res), list(grads)))
torch.save((torch.backends.cpu.get_cpu_capability(), out), sys.argv[2])
"""


def test_forward_bits_are_the_same_in_every_build(tmp_path):
    """The float32 forward (outputs, window indices, statistics) is the same bits in the
    portable (W = 4 lanes), AVX2 (8) and AVX-512 (16) builds and in the AVX-512 intrinsics
    kernels: each lane runs the same fused multiply-adds in tap order, so nothing may
    depend on the lane count. The backward's sums are float32 vectors of W lanes, so only
    the same W gives the same bits: the AVX-512 intrinsics kernels and their portable
    twin (SCALEINV_NO_AVX512=1) on a CPU with AVX-512. Each setting is read once per
    process, so each runs in a fresh one; the inputs are made here (torch's random
    kernels draw differently per build)."""
    # (N, groups, C_in, C_out, H, W, KH, KW, ph, pw): the compiled tap geometries (grey and
    # RGB 3x3, grey 5x5), a runtime one (3x1), tails of 1..W-1 windows, one channel (no
    # pair), the real input layer
    rows = [(4, 3, 1, 4, 7, 5, 3, 3, 1, 1), (2, 1, 3, 5, 8, 9, 3, 3, 1, 1),
            (2, 2, 1, 4, 9, 8, 5, 5, 2, 1), (2, 2, 1, 3, 5, 37, 3, 1, 1, 0),
            (1, 1, 3, 1, 4, 70, 3, 3, 0, 1), (3, 4, 1, 16, 28, 28, 3, 3, 1, 1)]
    inputs = []
    gen = torch.Generator().manual_seed(7)
    for n, g, ci, co, h, w, kh, kw, ph, pw in rows:
        c = g * co
        inputs.append((torch.randn(n, g * ci, h, w, generator=gen),
                       torch.randn(c, ci, kh, kw, generator=gen),
                       torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen),
                       torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
                       torch.randn(n, c, (h + 2 * ph - kh + 1) // 2,
                                   (w + 2 * pw - kw + 1) // 2, generator=gen), g, [ph, pw]))
    torch.save(inputs, tmp_path / "inputs.pt")
    # what the CPU supports (not the capability this process was started with)
    settings = [{"ATEN_CPU_CAPABILITY": "default"}]
    if torch.cpu._is_avx2_supported():
        settings.append({"ATEN_CPU_CAPABILITY": "avx2"})
    avx512 = torch.cpu._is_avx512_supported()
    if avx512:
        settings += [{"ATEN_CPU_CAPABILITY": "avx512"},
                     {"ATEN_CPU_CAPABILITY": "avx512", "SCALEINV_NO_AVX512": "1"}]
    results = []
    for i, setting in enumerate(settings):
        path = tmp_path / f"run{i}.pt"
        run = subprocess.run([sys.executable, "-c", ACROSS_BUILDS_SCRIPT,
                              str(tmp_path / "inputs.pt"), str(path)],
                             env={**os.environ, **setting}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        used, out = torch.load(path)
        assert used.lower() == setting["ATEN_CPU_CAPABILITY"]
        results.append(out)
    assert len(results) >= 2, "at least the portable and one vector build run here"
    for setting, out in zip(settings[1:], results[1:]):
        for case, ((fwd, _), (fwd0, _)) in enumerate(zip(out, results[0])):
            for k, (a, e) in enumerate(zip(fwd[:4], fwd0[:4])):
                assert_bitwise(a, e, f"{setting}: case {case} forward output {k}")
    if avx512:
        for case, ((_, grads), (_, grads0)) in enumerate(zip(results[3], results[2])):
            for k, (a, e) in enumerate(zip(grads, grads0)):
                assert_bitwise(a, e, f"portable twin vs AVX-512: case {case} gradient {k}")
