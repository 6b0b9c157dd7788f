"""scaleinv::bn_act_pool — fused BatchNorm → ReLU → MaxPool2d(2) against plain torch.

The C++ op (through the autograd-registered layer :func:`bn_act_pool`) must equal the
unfused reference ``F.batch_norm → relu → max_pool2d`` in output, running statistics and
gradients (fp32: within 1e-5 of the largest magnitude). The Triton kernels (tests marked
``triton``) run on ``tests.devices.TRITON_DEVICE``: compiled on CUDA tensors where CUDA is
present, else under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); their results are compared on the CPU with the float64 contract and
the C++ op. The kernels are also compiled ahead of time for sm_90/sm_80.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scaleinv_kernels.ops import norm_act as na
from scaleinv_kernels.ops import norm_common as nc
from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference, bn_act_pool_torch
from tests.devices import TRITON_DEVICE
from tests.helpers import assert_bitwise, assert_close, spy_wrap_triton

# (shape, pool): odd H/W with pooling, N=1, C=1, 1x1 without pool, 3-D without pool
CASES = [
    ((4, 3, 7, 5), 2),
    ((1, 2, 4, 6), 2),
    ((5, 1, 6, 3), 2),
    ((2, 3, 5, 37), 2),  # 18 windows a row: more than one 16-wide AVX-512 step
    ((3, 4, 1, 1), 0),
    ((2, 3, 9), 0),
    ((2, 3, 5, 5), 0),
    # without pool the C++ kernel runs tiny planes (<= 144 B) as flat runs of a channel
    # group, larger ones plane by plane (csrc/bn_act.cpp, flat_runs): both routes
    ((6, 37, 5, 5), 0),  # groups of several 25-value planes, flat
    ((5, 7), 0),  # BatchNorm1d-like [N, C], flat
    ((6, 37, 7, 7), 0),  # the ensemble's last layer: plane by plane
]
MOMENTUM, EPS = 0.1, 1e-5


def _dev(*tensors):
    """The tensors on TRITON_DEVICE (None stays None)."""
    return [None if t is None else t.to(TRITON_DEVICE) for t in tensors]


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def _make(shape, affine, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if affine else None
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, rm, rv


def _run(fn, x, w, b, rm, rv, go_seed=1, **kw):
    """Forward + backward of ``fn`` on fresh leaves; returns (out, rm, rv, grads)."""
    x = x.clone().requires_grad_()
    leaves = [x]
    if w is not None:
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        leaves += [w, b]
    rm = rm.clone() if rm is not None else None
    rv = rv.clone() if rv is not None else None
    y = fn(x, w, b, rm, rv, **kw)
    gen = torch.Generator().manual_seed(go_seed)
    go = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, go)
    return y, rm, rv, grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-pool{c[1]}")
def test_matches_reference(case, relu, affine, training):
    shape, pool = case
    x, w, b, rm, rv = _make(shape, affine, seed=hash((shape, relu, affine)) % 1000)
    kw = dict(training=training, momentum=MOMENTUM, eps=EPS, relu=relu, pool=pool)
    got = _run(bn_act_pool, x, w, b, rm, rv, **kw)
    ref = _run(bn_act_pool_reference, x, w, b, rm, rv, **kw)
    assert_close(got[0], ref[0], "out")
    assert_close(got[1], ref[1], "running_mean")
    assert_close(got[2], ref[2], "running_var")
    for name, g, r in zip(("grad x", "grad weight", "grad bias"), got[3], ref[3]):
        assert_close(g, r, name)
    if not training:
        assert_bitwise(got[1], rm, "running_mean changed in eval")


def test_no_running_stats_uses_batch_stats():
    x, w, b, _, _ = _make((3, 4, 6, 6), True)
    for training in (True, False):
        kw = dict(training=training, momentum=MOMENTUM, eps=EPS)
        got = _run(bn_act_pool, x, w, b, None, None, **kw)
        ref = _run(bn_act_pool_reference, x, w, b, None, None, **kw)
        assert_close(got[0], ref[0], "out")
        for g, r in zip(got[3], ref[3]):
            assert_close(g, r, "grads")


def test_float64_gradcheck_and_reference():
    x, w, b, rm, rv = _make((2, 3, 5, 4), True, dtype=torch.float64)
    for training in (True, False):
        for pool in (0, 2):
            kw = dict(training=training, momentum=MOMENTUM, eps=EPS, relu=True, pool=pool)
            got = _run(bn_act_pool, x, w, b, rm, rv, **kw)
            ref = _run(bn_act_pool_reference, x, w, b, rm, rv, **kw)
            for g, r in zip((got[0], got[1], got[2], *got[3]),
                            (ref[0], ref[1], ref[2], *ref[3])):
                assert_close(g, r, f"fp64 train={training} pool={pool}", rtol=1e-12)
            args = (x.clone().requires_grad_(), w.clone().requires_grad_(),
                    b.clone().requires_grad_())
            assert torch.autograd.gradcheck(
                lambda x, w, b, kw=kw: bn_act_pool(x, w, b, rm.clone(), rv.clone(), **kw),
                args)


def _local_index(flat, w):
    return ((flat // w) % 2 * 2 + flat % w % 2).to(torch.uint8)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ties_route_like_torch(training):
    """Many ties (integer values; constant planes): the index is the one max_pool2d
    returns and the gradient goes where torch's goes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (3, 2, 6, 7), generator=gen).float()
    x[1, 1] = 2.0  # a constant plane: every window a 4-way tie
    rm, rv = torch.ones(2), torch.ones(2)
    w, b = torch.ones(2), torch.zeros(2)
    kw = dict(training=training, momentum=MOMENTUM, eps=EPS, relu=True, pool=2)
    got = _run(bn_act_pool, x, w, b, rm, rv, **kw)
    ref = _run(bn_act_pool_reference, x, w, b, rm, rv, **kw)
    assert_close(got[0], ref[0], "out")
    for g, r in zip(got[3], ref[3]):
        assert_close(g, r, "grads")
    mean, invstd = (None, None) if training else (rm, rv.add(EPS).rsqrt())
    out, _, _, index = torch.ops.scaleinv.bn_act_pool(x, w, b, mean, invstd, EPS, True, 2)
    y = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, MOMENTUM, EPS))
    _, flat = F.max_pool2d(y, 2, return_indices=True)
    assert_bitwise(index, _local_index(flat, 7), "window index vs max_pool2d")


def test_constant_channel_training():
    """var = 0: x̂ = 0, invstd = 1/sqrt(eps); gradients still equal torch's. (float64:
    in fp32, x·invstd·w + (b − mean·invstd·w) cancels to ~1e-5 noise in torch itself.)"""
    f64 = dict(dtype=torch.float64)
    x = torch.full((2, 3, 4, 4), 1.5, **f64)
    w, b = torch.tensor([1.0, 2.0, 0.5], **f64), torch.tensor([0.3, -0.2, 0.0], **f64)
    rm, rv = torch.zeros(3, **f64), torch.ones(3, **f64)
    kw = dict(training=True, momentum=MOMENTUM, eps=EPS, relu=True, pool=2)
    got = _run(bn_act_pool, x, w, b, rm, rv, **kw)
    ref = _run(bn_act_pool_reference, x, w, b, rm, rv, **kw)
    for g, r in zip((got[0], got[1], got[2], *got[3]), (ref[0], ref[1], ref[2], *ref[3])):
        assert_close(g, r, "constant channel", rtol=1e-9)


def test_nan_propagates_like_torch():
    x, w, b, rm, rv = _make((2, 2, 4, 6), True)
    x[0, 0, 0, 1] = float("nan")  # second in its window: replaces the max
    x[0, 1, 3, 3] = float("nan")  # last in its window
    x[1, 0, 2, 2] = x[1, 0, 3, 3] = float("nan")  # two NaNs: torch keeps the later one
    invstd = rv.add(EPS).rsqrt()
    out, _, _, index = torch.ops.scaleinv.bn_act_pool(x, w, b, rm, invstd, EPS, True, 2)
    y = F.relu(F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS))
    ref, flat = F.max_pool2d(y, 2, return_indices=True)
    assert_bitwise(out.isnan(), ref.isnan(), "NaN positions")
    assert_close(out.nan_to_num(), ref.nan_to_num(), "out")
    assert_bitwise(index, _local_index(flat, 6), "index with NaNs")


@pytest.mark.parametrize("pool,relu", [(2, True), (2, False), (0, True), (0, False)], ids=str)
def test_signed_zeros_like_the_contract(pool, relu):
    """Zeros keep their sign as in the op's contract: with mean 0 and bias -0.0, x = -0.0
    gives -0.0 * alpha + (-0.0) = -0.0 (a kernel that broadcast the bias as 0 + b made it
    +0.0). Random values beside the zeros keep every kernel route busy."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, 10, generator=gen)
    x[torch.rand(x.shape, generator=gen) < 0.5] = -0.0
    x[:, 0] = -0.0  # whole windows of -0.0 (bias -0.0)
    w = torch.rand(4, generator=gen) + 0.5
    b = torch.tensor([-0.0, 0.0, -0.0, 0.5])
    mean, invstd = torch.zeros(4), torch.rand(4, generator=gen) + 0.5
    out, _, _, _ = torch.ops.scaleinv.bn_act_pool(x, w, b, mean, invstd, EPS, relu, pool)
    ref, _, _, _ = bn_act_pool_torch(x, w, b, mean, invstd, EPS, relu, pool)
    if not relu:
        assert bool(ref.signbit()[:, 0].all()), "the case has windows of negative zeros"
    assert_bitwise(out, ref, "signed zeros")


SIGNED_ZERO_SCRIPT = r"""
import torch
from scaleinv_kernels.ops.norm_act import bn_act_pool_torch
gen = torch.Generator().manual_seed(3)
x = torch.randn(3, 4, 6, 10, generator=gen)
x[torch.rand(x.shape, generator=gen) < 0.5] = -0.0
x[:, 0] = -0.0
w, b = torch.rand(4, generator=gen) + 0.5, torch.tensor([-0.0, 0.0, -0.0, 0.5])
mean, invstd = torch.zeros(4), torch.rand(4, generator=gen) + 0.5
for pool in (0, 2):
    for relu in (False, True):
        out = torch.ops.scaleinv.bn_act_pool(x, w, b, mean, invstd, 1e-5, relu, pool)[0]
        ref = bn_act_pool_torch(x, w, b, mean, invstd, 1e-5, relu, pool)[0]
        bad = (out != ref) | (out.signbit() != ref.signbit())
        assert not bool(bad.any()), f"pool={pool} relu={relu}: {int(bad.sum())} differ"
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("setting", ["SCALEINV_NO_AVX512=1", "ATEN_CPU_CAPABILITY=default"])
def test_signed_zeros_in_other_builds(setting):
    """The same signed-zero check in a fresh process on the portable kernels: the build an
    AVX-512 machine otherwise never runs (SCALEINV_NO_AVX512=1), and the default-ISA build."""
    key, value = setting.split("=")
    run = subprocess.run([sys.executable, "-c", SIGNED_ZERO_SCRIPT],
                         env={**os.environ, key: value}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if key == "ATEN_CPU_CAPABILITY":
        assert run.stdout.split()[-1] == "DEFAULT"


def test_noncontiguous_input():
    x, w, b, rm, rv = _make((3, 4, 6, 5), True)
    kw = dict(training=True, momentum=MOMENTUM, eps=EPS)
    ref = _run(bn_act_pool_reference, x, w, b, rm, rv, **kw)
    for xs in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous()
               .transpose(2, 3)):
        assert not xs.is_contiguous()
        got = _run(bn_act_pool, xs, w, b, rm, rv, **kw)
        for g, r in zip((got[0], got[1], got[2], *got[3]), (ref[0], ref[1], ref[2], *ref[3])):
            assert_close(g, r, "non-contiguous x")


def test_bad_input_raises():
    x, w, b, rm, rv = _make((2, 3, 4, 4), True)
    kw = dict(training=True, momentum=MOMENTUM, eps=EPS)
    cases = [
        (dict(x=x[:, :, 0]), ValueError, "pool=2 needs a 4-D x"),
        (dict(x=x[0, 0]), ValueError, "4-D"),
        (dict(pool=3), ValueError, "pool must be 0"),
        (dict(w=w[:2]), ValueError, r"weight must have shape \[C\] = \[3\]"),
        (dict(b=b.double()), TypeError, "bias must have x's dtype"),
        (dict(x=x.double()), TypeError, "weight must have x's dtype"),
        (dict(x=x.int(), w=None, b=None), TypeError, "float32 or float64"),
        (dict(x=x[:1, :, :2, :2].reshape(1, 3, 1, 4), pool=0, w=None, b=None), None, None),
        (dict(x=x[:1, :, :1, :1], pool=0), ValueError, "more than 1 value per channel"),
        (dict(x=x[:, :, :1]), ValueError, "H >= 2"),
        (dict(rv=None), ValueError, "both running_mean and running_var"),
    ]
    for change, error, text in cases:
        a = dict(x=x, w=w, b=b, rm=rm, rv=rv, pool=2)
        a.update(change)
        call = lambda a=a: bn_act_pool(a["x"], a["w"], a["b"], a["rm"], a["rv"], pool=a["pool"],
                                       **kw)
        if error is None:
            call()
            continue
        with pytest.raises(error, match=text):
            call()
    # the op itself (C++ checks) names the problem too
    op = torch.ops.scaleinv.bn_act_pool
    with pytest.raises(ValueError, match="pool must be 0"):
        op(x, w, b, None, None, EPS, True, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \[C\]"):
        op(x, w[:2], b, None, None, EPS, True, 2)
    with pytest.raises(ValueError, match="both mean and invstd"):
        op(x, w, b, rm, None, EPS, True, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(x.half(), None, None, None, None, EPS, True, 2)
    with pytest.raises(ValueError, match="4-D"):
        op(x[0], None, None, None, None, EPS, True, 2)
    out, sm, si, idx = op(x, w, b, None, None, EPS, True, 2)
    with pytest.raises(ValueError, match="grad_out and out must have the output's shape"):
        torch.ops.scaleinv.bn_act_pool_backward(x, x, w, b, sm, si, out, idx, True, True, 2,
                                                [True, True, True])


def _conditioning_case(pool, relu):
    """x, w, b, go on [8, 6, 10, 10] whose channels take both x̂ sources (see xhat_source):
    0 plain, 4 mean 7 std 1 (just inside the bound) and 5 (|b|/|w| = 6) from out; 1 mean
    50 std 1, 2 w = 0 and 3 b = 100 from x."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(8, 6, 10, 10, generator=gen, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), correction=0, keepdim=True)
    x = (z + torch.tensor([0.0, 50, 0, 0, 7, 0], dtype=torch.float64).view(1, 6, 1, 1)).float()
    w = torch.tensor([1.3, 0.8, 0.0, 1.0, 1.1, 0.5])
    b = torch.tensor([0.2, -0.4, 0.3, 100.0, 0.1, 3.0])
    if pool == 0:
        x = x[:, :, :3]  # [8, 6, 3, 10]
    out = torch.ops.scaleinv.bn_act_pool(x, w, b, None, None, EPS, relu, pool)
    go = torch.randn(out[0].shape, generator=gen)
    return x, w, b, go, out


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("pool,relu", [(2, True), (2, False), (0, True), (0, False)], ids=str)
def test_backward_xhat_source(pool, relu, backend):
    """The sums take x̂ from out on well-conditioned channels and from x elsewhere: both
    match the float64 reference, and perturbing out (same signs) moves grad_weight on
    exactly the channels xhat_source picks. Exception: the C++ kernel's flat runs for
    small planes without pooling (csrc/bn_act.cpp, flat_runs) read x on every channel,
    so there out's magnitude moves nothing. The Triton backward runs on TRITON_DEVICE;
    each channel's at most 200 positions fit one program on a GPU too (one block of
    MAX_BLOCK), so its sums have no atomics race and the unchanged channels stay bitwise
    equal between the two calls."""
    x, w, b, go, (out, sm, si, idx) = _conditioning_case(pool, relu)
    from_out = na.xhat_source(w, b, sm, si)[0]
    assert from_out.tolist() == [True, False, False, False, True, True]
    if backend == "cpp":
        def bwd(o):
            return torch.ops.scaleinv.bn_act_pool_backward(go, x, w, b, sm, si, o, idx, True,
                                                           relu, pool, [True, True, True])
    else:
        def bwd(o):
            args = _dev(go, x, w, b, sm, si, o, idx)
            return _cpu(*na.bn_act_pool_backward_triton(*args, True, relu, pool,
                                                        [True, True, True]))
    got = bwd(out)
    ref = na.bn_act_pool_backward_torch(go.double(), x.double(), w.double(), b.double(),
                                        sm.double(), si.double(), out.double(), idx, True,
                                        relu, pool, [True, True, True])
    for name, g, r in zip(("grad x", "grad weight", "grad bias"), got, ref):
        assert_close(g, r, f"{backend} {name}")
    moved = bwd(torch.where(out > 0, out * 1.01, out))
    changed = moved[1] != got[1]
    flat = backend == "cpp" and pool == 0  # [8, 6, 3, 10]: 120-byte planes
    assert changed.tolist() == ([False] * 6 if flat else from_out.tolist())
    assert_bitwise(moved[2], got[2], "grad bias does not depend on out's magnitude")


PORTABLE_SCRIPT = r"""
import torch
from scaleinv_kernels.ops.norm_act import bn_act_pool, bn_act_pool_reference
torch.manual_seed(0)  # w and b below: the same inputs in every run
worst = 0.0
for shape in ((4, 3, 7, 5), (2, 2, 6, 36), (3, 2, 4, 3), (3, 40, 14, 13)):
    for training in (True, False):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        x[:, 1::3] += 40  # channels whose backward sums read x (mean 40 std 1), the rest out
        w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
        res = []
        for fn in (bn_act_pool, bn_act_pool_reference):
            xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
            y = fn(xx, ww, bb, torch.zeros(shape[1]), torch.ones(shape[1]), training=training)
            go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            res.append((y, *torch.autograd.grad(y, (xx, ww, bb), go)))
        for a, e in zip(*res):
            worst = max(worst, float((a - e).detach().abs().max() / e.detach().abs().max()))
print(worst)
"""


@pytest.mark.parametrize("setting", ["SCALEINV_NO_AVX512=1", "SCALEINV_STREAM_MIN_BYTES=0"])
def test_other_kernel_paths_match_reference(setting):
    """Read once per process, so each runs in a fresh one. SCALEINV_NO_AVX512=1: the plain
    C++ loops that machines without AVX-512 use instead of the intrinsics kernels.
    SCALEINV_STREAM_MIN_BYTES=0: every pooled float32 backward writes dx through the
    staging buffer and non-temporal stores (by default only a dx of >= 64 MiB)."""
    key, value = setting.split("=")
    env = {**os.environ, key: value}
    run = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5


OPCHECK_ARGS = [
    ((4, 3, 7, 5), True, False, True, 2),   # shape, affine, eval, relu, pool
    ((4, 3, 6, 6), False, True, True, 2),
    ((3, 2, 5), True, True, False, 0),
]


@pytest.mark.parametrize("args", OPCHECK_ARGS, ids=str)
def test_opcheck_cpu(args):
    shape, affine, eval_mode, relu, pool = args
    x, w, b, rm, rv = _make(shape, affine)
    x.requires_grad_()
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    mean, invstd = (rm, rv.add(EPS).rsqrt()) if eval_mode else (None, None)
    torch.library.opcheck(torch.ops.scaleinv.bn_act_pool.default,
                          (x, w, b, mean, invstd, EPS, relu, pool))
    out, sm, si, idx = torch.ops.scaleinv.bn_act_pool(x.detach(), w, b, mean, invstd, EPS, relu,
                                                      pool)
    go = torch.randn_like(out)
    # the backward op has no autograd of its own
    w, b = (w.detach(), b.detach()) if affine else (None, None)
    torch.library.opcheck(torch.ops.scaleinv.bn_act_pool_backward.default,
                          (go, x.detach(), w, b, sm, si, out.detach(), idx, not eval_mode,
                           relu, pool, [True, affine, affine]))


# ---- Triton kernels under the interpreter -------------------------------------------

TRITON_CASES = [
    ((4, 3, 7, 5), 2, True, True, True),   # shape, pool, relu, affine, training
    ((4, 3, 7, 5), 2, True, True, False),
    ((2, 2, 6, 4), 2, False, False, True),
    ((2, 2, 5, 37), 2, True, False, True),
    ((3, 4, 1, 1), 0, True, True, True),
    ((2, 3, 9), 0, False, True, False),
]


def _f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _triton_vs_contract(shape, pool, relu, affine, training, seed=5, **geometry):
    """The Triton forward and backward on TRITON_DEVICE against the float64 contract
    (``bn_act_pool_torch`` / ``_backward_torch`` on CPU), the index bit for bit, also
    against the C++ op. ``geometry``: the launchers' max_block/split."""
    x, w, b, rm, rv = _make(shape, affine, seed=seed)
    mean, invstd = (None, None) if training else (rm, rv.add(EPS).rsqrt())
    fwd = _cpu(*na.bn_act_pool_triton(*_dev(x, w, b, mean, invstd), EPS, relu, pool,
                                      **geometry))
    ref = na.bn_act_pool_torch(*_f64(x, w, b, mean, invstd), EPS, relu, pool)
    for name, g, r in zip(("out", "save_mean", "save_invstd"), fwd, ref):
        assert g.dtype == torch.float32
        assert_close(g, r, f"triton {name}")
    assert_bitwise(fwd[3], ref[3], "triton index")
    cpp = torch.ops.scaleinv.bn_act_pool(x, w, b, mean, invstd, EPS, relu, pool)
    assert_bitwise(fwd[3], cpp[3], "triton index vs C++")
    go = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(2))
    mask = [True, affine, affine]
    saved = _dev(fwd[1], fwd[2], fwd[0], fwd[3])  # save_mean, save_invstd, out, index
    got = _cpu(*na.bn_act_pool_backward_triton(*_dev(go, x, w, b), *saved, training, relu,
                                               pool, mask, **geometry))
    exp = na.bn_act_pool_backward_torch(*_f64(go, x, w, b), ref[1], ref[2], ref[0], ref[3],
                                        training, relu, pool, mask)
    for name, g, r in zip(("grad x", "grad weight", "grad bias"), got, exp):
        if r is None:
            assert g is None, name
        else:
            assert_close(g, r, f"triton {name}")


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_op_contract(case):
    _triton_vs_contract(*case)


@contextlib.contextmanager
def record_launches(module):
    """Record (kernel name, grid) of every Triton launch ``module`` makes through
    ``launch`` in the block."""
    launches = []
    real = module.launch

    def spy(kernel, grid, *args, **kwargs):
        launches.append((kernel.fn.__name__, grid))
        return real(kernel, grid, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "launch", spy)
        yield launches


# (shape, pool, relu, affine, training) that, with max_block=16, span several blocks per
# plane in every elementwise kernel and several programs per channel in every reduction:
# odd planes of 11x13 (30 pooled windows, 143 inputs), 5x7 and a 3-D 1x19 without pool
SPLIT_CASES = [
    ((2, 3, 11, 13), 2, True, True, True),
    ((2, 3, 11, 13), 2, False, True, False),
    ((3, 2, 5, 7), 0, True, False, True),
    ((3, 2, 19), 0, False, True, True),
]


@pytest.mark.triton
@pytest.mark.parametrize("split", [3, 64], ids=["split3", "split64-capped"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_triton_multi_program_paths(case, split):
    """max_block=16 and split force what a GPU-sized plane does: blocks beyond the first
    of a plane (the forward saves the statistics from block 0 of sample 0 only; dx and
    the pooled windows index from the block offset) and reductions split over programs
    whose partial sums meet in the atomics (split=64 asks for more programs than a
    channel has blocks: capped at one per block). Against the float64 contract."""
    shape, pool, relu, affine, training = case
    with record_launches(na) as launches:
        # a seed per split: no output can pass by holding the previous run's values
        _triton_vs_contract(shape, pool, relu, affine, training, seed=split, max_block=16,
                            split=split)
    kernels = {name for name, _ in launches}
    assert {"fwd_kernel", "bwd_dx_kernel"} <= kernels
    assert ("stats_kernel" in kernels) == training
    assert ("bwd_reduce_kernel" in kernels) == (training or affine)
    for name, grid in launches:
        assert grid[1] > 1, f"{name} ran one program per plane/channel: {grid}"


def test_launch_geometry_keywords_are_checked():
    x = torch.randn(2, 3, 4, 4)
    for bad in (8, 24, 2048, True):
        with pytest.raises(ValueError, match="max_block must be a power of two"):
            na.bn_act_pool_triton(x, None, None, None, None, EPS, True, 2, max_block=bad)
    with pytest.raises(ValueError, match="split must be None or an int >= 1"):
        na.bn_act_pool_triton(x, None, None, None, None, EPS, True, 2, split=0)


@pytest.mark.triton
def test_triton_launches_go_through_wrap_triton(monkeypatch):
    """Every launch asks torch.library.wrap_triton for its kernel (torch 2.11's refuses an
    interpreted kernel, which is then launched directly) and the kernels run."""
    seen = spy_wrap_triton(monkeypatch)
    x, w, b, _, _ = _dev(*_make((2, 3, 6, 5), True, seed=4))
    out, sm, si, idx = na.bn_act_pool_triton(x, w, b, None, None, EPS, True, 2)
    assert seen == [nc.stats_kernel, nc.fwd_kernel]
    dx, _, _ = na.bn_act_pool_backward_triton(torch.ones_like(out), x, w, b, sm, si, out, idx,
                                              True, True, 2, [True, True, True])
    assert seen[2:] == [nc.bwd_reduce_kernel, nc.bwd_dx_kernel]
    assert bool(torch.isfinite(dx).all()) and bool(out.abs().sum() > 0)


ROOT = Path(__file__).resolve().parents[2]  # the AOT scripts import tests.aot

AOT_SCRIPT = r"""
import json, sys
from scaleinv_kernels.ops import norm_common as m
from tests.aot import compile_for, ptxas_usage
P, F, I = "*fp32", "fp32", "i32"
kernels = {
    "stats": (m.stats_kernel, dict(x_ptr=P, sums_ptr="*fp64", C=I, HW=I, total=I,
                                     per_prog=I), [dict(BLOCK=1024)]),
    "fwd": (m.fwd_kernel, dict(x_ptr=P, w_ptr=P, b_ptr=P, sums_ptr="*fp64", mean_ptr=P,
                                invstd_ptr=P, out_ptr=P, ind_ptr="*u8", C=I, W=I, HW=I, Wo=I,
                                HWo=I, count=I, eps=F),
            [dict(TRAINING=True, HAS_W=True, HAS_B=True, RELU=True, POOL=2, BLOCK=256),
             dict(TRAINING=False, HAS_W=False, HAS_B=False, RELU=False, POOL=0, BLOCK=1024)]),
    "bwd_reduce": (m.bwd_reduce_kernel, dict(gout_ptr=P, x_ptr=P, from_out_ptr="*i8",
                                              shift_ptr=P, out_ptr=P, ind_ptr="*u8",
                                              sums_ptr="*fp64", C=I, W=I, HW=I, Wo=I, HWo=I,
                                              total=I, per_prog=I),
                   [dict(RELU=True, POOL=2, BLOCK=1024), dict(RELU=False, POOL=0, BLOCK=1024)]),
    "bwd_dx": (m.bwd_dx_kernel, dict(gout_ptr=P, x_ptr=P, w_ptr=P, mean_ptr=P, invstd_ptr=P,
                                      out_ptr=P, ind_ptr="*u8", sums_ptr="*fp64", coef_ptr=P,
                                      dx_ptr=P, C=I, W=I, HW=I, Ho=I, Wo=I, HWo=I, count=I),
               [dict(TRAINING=True, HAS_W=True, RELU=True, POOL=2, BLOCK=1024, COEF=False),
                dict(TRAINING=False, HAS_W=False, RELU=False, POOL=0, BLOCK=256, COEF=False),
                dict(TRAINING=True, HAS_W=False, RELU=True, POOL=2, BLOCK=256, COEF=True)]),
}
out = []
for arch in map(int, sys.argv[1:]):
    for name, (fn, sig, variants) in kernels.items():
        # every variant for sm_90, the first (most general) one for sm_80
        for consts in variants if arch == 90 else variants[:1]:
            nw = 8 if name in ("stats", "bwd_reduce") else 4
            k = compile_for(fn, sig, consts, arch, num_warps=nw)
            regs, spills = ptxas_usage(k.asm["ptx"], arch)
            out.append(dict(arch=arch, kernel=name, consts={c: str(v) for c, v in consts.items()},
                            registers=regs, spill_bytes=spills, cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


def test_triton_kernels_compile_ahead_of_time():
    """Compile every kernel for sm_90 and sm_80 without a GPU (catches what the interpreter
    lets through: types, fp64 atomics, constexpr branches), no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT, "90", "80"], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    variants = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(variants) == 12
    for v in variants:
        print(v)  # registers/spills in the test log (pytest -s / -rA)
        assert v["cubin"] > 0
        assert v["spill_bytes"] == 0, f"register spills in {v}"


@pytest.mark.parametrize("given", ["weight", "bias"])
@pytest.mark.parametrize("mode", ["batch", "group"])
def test_only_weight_or_only_bias_gradients(mode, given):
    """Regression: the C++ autograd asked for the bias's needs_input_grad at the position it
    has when weight is given too; with a bias and no weight that index does not exist
    (autograd counts only the tensors passed) and the backward failed."""
    from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 6, 6, generator=gen, dtype=torch.float64).float().requires_grad_()
    p = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).float().requires_grad_()
    w, b = (p, None) if given == "weight" else (None, p)
    if mode == "batch":
        y = bn_act_pool(x, w, b, None, None, training=True)
        ref = bn_act_pool_reference(x, w, b, None, None, training=True)
    else:
        y = gn_act_pool(x, w, b, 2)
        # torch's own group_norm backward fails for a bias without a weight ("tensor does
        # not have a device", torch 2.13): the reference gets the weight it implies, ones
        ref = gn_act_pool_reference(x, torch.ones(4) if w is None else w, b, 2)
    go = torch.randn(ref.shape, generator=gen, dtype=torch.float64).float()
    got = torch.autograd.grad(y, [x, p], go)
    want = torch.autograd.grad(ref, [x, p], go)
    assert_close(got[0], want[0], "grad_x")
    assert_close(got[1], want[1], f"grad_{given}")
