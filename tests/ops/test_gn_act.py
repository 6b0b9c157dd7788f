"""scaleinv::gn_act_pool — fused GroupNorm → ReLU → MaxPool2d(2) against plain torch.

The C++ op (through the autograd-registered :func:`gn_act_pool`) must equal the unfused
layers ``F.group_norm → relu → max_pool2d`` run in float64 (fp32: within 1e-5 of the
largest magnitude), in output and in the gradients of x, weight and bias; the torch
backend that CUDA runs without triton is checked against the C++ op on CPU. The Triton
kernels (tests marked ``triton``) run on ``tests.devices.TRITON_DEVICE`` (compiled on
CUDA, else interpreted on CPU tensors) and are compared on the CPU with the float64
contract.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from scaleinv_kernels.ops import gn_act as ga
from scaleinv_kernels.ops import norm_common as nc
from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference
from tests.devices import TRITON_DEVICE
from tests.helpers import assert_bitwise, assert_close, spy_wrap_triton
from tests.ops.test_norm_act import record_launches

EPS = 1e-5
# (shape, groups, pool): odd H/W with pooling, N=1, one group, one channel per group,
# 18 windows a row (two 16-lane AVX-512 steps), narrow planes (row pairs), no pool 3-D/2-D
CASES = [
    ((4, 6, 7, 5), 3, 2),
    ((1, 4, 6, 6), 1, 2),
    ((3, 4, 5, 4), 4, 2),
    ((2, 6, 5, 37), 2, 2),
    ((2, 8, 14, 14), 4, 2),
    ((3, 8, 9), 4, 0),
    ((5, 6, 3), 2, 0),
    ((2, 6, 5, 5), 3, 0),
]


def _make(shape, affine, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if affine else None
    return x, w, b


def _run(fn, x, w, b, groups, go_seed=1, **kw):
    """Forward + backward of ``fn`` on fresh leaves; returns (out, grads)."""
    leaves = [x.clone().requires_grad_()]
    if w is not None:
        leaves += [w.clone().requires_grad_(), b.clone().requires_grad_()]
    y = fn(leaves[0], *(leaves[1:] if w is not None else (None, None)), groups, **kw)
    gen = torch.Generator().manual_seed(go_seed)
    go = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    return y, torch.autograd.grad(y, leaves, go)


def _f64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[1]}-pool{c[2]}")
def test_matches_float64_reference(case, relu, affine):
    shape, groups, pool = case
    x, w, b = _make(shape, affine, seed=sum(shape) + groups)
    got = _run(gn_act_pool, x, w, b, groups, relu=relu, pool=pool, eps=EPS)
    ref = _run(gn_act_pool_reference, x.double(), _f64(w), _f64(b), groups, relu=relu,
               pool=pool, eps=EPS)
    assert got[0].dtype == torch.float32
    assert_close(got[0], ref[0], "out")
    for name, g, r in zip(("grad x", "grad weight", "grad bias"), got[1], ref[1]):
        assert_close(g, r, name)


def test_float64_gradcheck():
    x, w, b = _make((2, 4, 5, 4), True, dtype=torch.float64)
    for pool in (0, 2):
        got = _run(gn_act_pool, x, w, b, 2, pool=pool)
        ref = _run(gn_act_pool_reference, x, w, b, 2, pool=pool)
        for g, r in zip((got[0], *got[1]), (ref[0], *ref[1])):
            assert_close(g, r, f"fp64 pool={pool}", rtol=1e-12)
        args = tuple(t.clone().requires_grad_() for t in (x, w, b))
        assert torch.autograd.gradcheck(
            lambda x, w, b, pool=pool: gn_act_pool(x, w, b, 2, pool=pool), args)


def test_statistics_and_index():
    """save_mean/save_invstd are the per-(sample, group) statistics, [N, G]; the index is
    the window position max_pool2d picks."""
    x, w, b = _make((3, 6, 6, 7), True)
    out, mean, invstd, index = torch.ops.scaleinv.gn_act_pool(x, w, b, 3, EPS, True, 2)
    var, m = torch.var_mean(x.double().reshape(3, 3, -1), dim=2, correction=0)
    assert mean.shape == invstd.shape == (3, 3)
    assert_close(mean, m, "mean")
    assert_close(invstd, (var + EPS).rsqrt(), "invstd")
    y = torch.relu(torch.nn.functional.group_norm(x, 3, w, b, EPS))
    _, flat = torch.nn.functional.max_pool2d(y, 2, return_indices=True)
    assert_bitwise(index, ((flat // 7) % 2 * 2 + flat % 7 % 2).to(torch.uint8), "index")


def test_torch_backend_matches_cpp():
    """Without triton the CUDA registration runs gn_act_pool_torch /
    gn_act_pool_backward_torch: same contract as the C++ op."""
    for shape, groups, pool in CASES[:5]:
        x, w, b = _make(shape, True, seed=7)
        cpp = torch.ops.scaleinv.gn_act_pool(x, w, b, groups, EPS, True, pool)
        ref = ga.gn_act_pool_torch(x, w, b, groups, EPS, True, pool)
        for name, g, r in zip(("out", "mean", "invstd"), cpp, ref):
            assert_close(g, r, f"torch backend {name}")
        assert_bitwise(cpp[3], ref[3], "torch backend index")
        go = torch.randn(cpp[0].shape, generator=torch.Generator().manual_seed(2))
        mask = [True, True, True]
        got = torch.ops.scaleinv.gn_act_pool_backward(go, x, w, *cpp[1:3], cpp[0], cpp[3],
                                                      groups, True, pool, mask)
        exp = ga.gn_act_pool_backward_torch(go, x, w, *cpp[1:3], cpp[0], cpp[3], groups, True,
                                            pool, mask)
        for name, g, r in zip(("grad x", "grad weight", "grad bias"), got, exp):
            assert_close(g, r, f"torch backend {name}")


def test_deterministic_and_empty():
    x, w, b = _make((4, 8, 10, 10), True)
    a = _run(gn_act_pool, x, w, b, 4)
    c = _run(gn_act_pool, x, w, b, 4)
    for p, q in zip((a[0], *a[1]), (c[0], *c[1])):
        assert_bitwise(p, q, "two runs")
    empty = torch.empty(0, 4, 6, 6, requires_grad=True)
    y = gn_act_pool(empty, None, None, 2)
    assert y.shape == (0, 4, 3, 3)
    (g,) = torch.autograd.grad(y, empty, torch.empty_like(y))
    assert g.shape == empty.shape


def test_bad_input_raises():
    x, w, b = _make((2, 6, 4, 4), True)
    cases = [
        (dict(groups=4), ValueError, "groups must be an int >= 1 that divides the 6"),
        (dict(groups=0), ValueError, "groups must be"),
        (dict(groups=True), ValueError, "groups must be"),
        (dict(pool=3), ValueError, "pool must be 0"),
        (dict(x=x[:, :, 0]), ValueError, "pool=2 needs a 4-D x"),
        (dict(w=w[:2]), ValueError, r"weight must have shape \[C\] = \[6\]"),
        (dict(b=b.double()), TypeError, "bias must have x's dtype"),
        (dict(x=x.half(), w=None, b=None), TypeError, "float32 or float64"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    ]
    for change, error, text in cases:
        a = dict(x=x, w=w, b=b, groups=3, pool=2, eps=EPS)
        a.update(change)
        with pytest.raises(error, match=text):
            gn_act_pool(a["x"], a["w"], a["b"], a["groups"], pool=a["pool"], eps=a["eps"])
    # the op itself (C++ checks) names the problem too
    op = torch.ops.scaleinv.gn_act_pool
    with pytest.raises(ValueError, match="groups must be >= 1 and divide the 6 channels"):
        op(x, w, b, 4, EPS, True, 2)
    out, mean, invstd, idx = op(x, w, b, 3, EPS, True, 2)
    with pytest.raises(ValueError, match=r"save_mean and save_invstd must have shape \[N, "):
        torch.ops.scaleinv.gn_act_pool_backward(out, x, w, mean[:, :2], invstd, out, idx, 3,
                                                True, 2, [True, True, True])
    with pytest.raises(ValueError, match="grad_out and out must have the output's shape"):
        torch.ops.scaleinv.gn_act_pool_backward(x, x, w, mean, invstd, out, idx, 3, True, 2,
                                                [True, True, True])


@pytest.mark.parametrize("args", [((4, 6, 7, 5), True, True, 2), ((3, 4, 5), False, False, 0)],
                         ids=str)
def test_opcheck_cpu(args):
    shape, affine, relu, pool = args
    x, w, b = _make(shape, affine)
    x.requires_grad_()
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    torch.library.opcheck(torch.ops.scaleinv.gn_act_pool.default, (x, w, b, 2, EPS, relu, pool))
    out, m, s, idx = torch.ops.scaleinv.gn_act_pool(x.detach(), w, b, 2, EPS, relu, pool)
    go = torch.randn_like(out)
    w = w.detach() if affine else None  # the backward op has no autograd of its own
    torch.library.opcheck(torch.ops.scaleinv.gn_act_pool_backward.default,
                          (go, x.detach(), w, m, s, out.detach(), idx, 2, relu, pool,
                           [True, affine, affine]))


PORTABLE_SCRIPT = r"""
import torch
from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference
worst = 0.0
for shape, groups in (((4, 6, 7, 5), 3), ((2, 4, 6, 36), 2), ((3, 8, 14, 14), 4)):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    res = []
    for fn, dt in ((gn_act_pool, torch.float32), (gn_act_pool_reference, torch.float64)):
        xx, ww, bb = (t.to(dt).requires_grad_() for t in (x, w, b))
        y = fn(xx, ww, bb, groups)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(dt)
        res.append((y, *torch.autograd.grad(y, (xx, ww, bb), go)))
    for a, e in zip(*res):
        worst = max(worst, float((a.double() - e).detach().abs().max() / e.detach().abs().max()))
print(worst)
"""


def test_portable_kernels_match_reference():
    """SCALEINV_NO_AVX512=1 (read once per process): the plain C++ loops machines without
    AVX-512 run."""
    env = {**os.environ, "SCALEINV_NO_AVX512": "1"}
    run = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5


# ---- Triton (BatchNorm's kernels over plane / group views) under the interpreter -----

TRITON_CASES = [
    ((4, 6, 7, 5), 3, 2, True, True),   # shape, groups, pool, relu, affine
    ((2, 4, 6, 6), 1, 2, False, False),
    ((2, 6, 5, 37), 6, 2, True, True),
    ((3, 8, 9), 4, 0, True, True),
    ((3, 4, 5, 5), 2, 0, False, False),
]


def _dev(*tensors):
    return [None if t is None else t.to(TRITON_DEVICE) for t in tensors]


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def _triton_vs_contract(shape, groups, pool, relu, affine, seed=5, **geometry):
    """gn_act_pool_triton / _backward_triton (the CUDA kernels) on TRITON_DEVICE against
    the float64 torch contract on CPU; the index bit for bit. ``geometry``: the
    launchers' max_block/split."""
    x, w, b = _make(shape, affine, seed=seed)
    fwd = _cpu(*ga.gn_act_pool_triton(*_dev(x, w, b), groups, EPS, relu, pool, **geometry))
    ref = ga.gn_act_pool_torch(x.double(), _f64(w), _f64(b), groups, EPS, relu, pool)
    for name, g, r in zip(("out", "save_mean", "save_invstd"), fwd, ref):
        assert g.dtype == torch.float32
        assert_close(g, r, f"triton {name}")
    assert_bitwise(fwd[3], ref[3], "triton index")
    go = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(2))
    mask = [True, affine, affine]
    got = _cpu(*ga.gn_act_pool_backward_triton(*_dev(go, x, w, fwd[1], fwd[2], fwd[0], fwd[3]),
                                               groups, relu, pool, mask, **geometry))
    exp = ga.gn_act_pool_backward_torch(go.double(), x.double(), _f64(w), ref[1], ref[2],
                                        ref[0], ref[3], groups, relu, pool, mask)
    for name, g, r in zip(("grad x", "grad weight", "grad bias"), got, exp):
        if r is None:
            assert g is None, name
        else:
            assert_close(g, r, f"triton {name}")


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_op_contract(case):
    _triton_vs_contract(*case)


# (shape, groups, pool, relu, affine) that, with max_block=16, span several blocks per
# plane and several programs per (sample, group) statistics block and per plane's
# routed sums: 9x11 planes (20 pooled windows, 99 inputs), a 3-D 1x21 without pool
SPLIT_CASES = [
    ((2, 4, 9, 11), 2, 2, True, True),
    ((2, 6, 9, 11), 6, 2, False, False),
    ((3, 4, 21), 4, 0, True, True),
]


@pytest.mark.triton
@pytest.mark.parametrize("split", [3, 64], ids=["split3", "split64-capped"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_triton_multi_program_paths(case, split):
    """max_block=16 and split force the launch geometry of GPU-sized planes on small odd
    shapes (see test_norm_act's test of the same name): every launch spans several
    programs per plane or block; results against the float64 contract."""
    with record_launches(ga) as launches:
        _triton_vs_contract(*case, seed=split, max_block=16, split=split)
    assert [name for name, _ in launches] == ["stats_kernel", "fwd_kernel",
                                              "bwd_reduce_kernel", "bwd_dx_kernel"]
    for name, grid in launches:
        assert grid[1] > 1, f"{name} ran one program per plane/block: {grid}"


@pytest.mark.triton
def test_triton_launches_go_through_wrap_triton(monkeypatch):
    """Every launch asks torch.library.wrap_triton for its kernel and the kernels run."""
    seen = spy_wrap_triton(monkeypatch)
    x, w, b = _dev(*_make((2, 4, 6, 5), True, seed=4))
    out, mean, invstd, idx = ga.gn_act_pool_triton(x, w, b, 2, EPS, True, 2)
    dx, _, _ = ga.gn_act_pool_backward_triton(torch.ones_like(out), x, w, mean, invstd, out,
                                              idx, 2, True, 2, [True, True, True])
    assert seen == [nc.stats_kernel, nc.fwd_kernel, nc.bwd_reduce_kernel,
                    nc.bwd_dx_kernel]
    assert bool(torch.isfinite(dx).all()) and bool(out.abs().sum() > 0)
