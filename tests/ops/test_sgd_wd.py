"""scaleinv::sgd_wd_ — every backend against the plain-torch reference.

The C++ kernel runs on CPU tensors; the Triton kernel on ``tests.devices.TRITON_DEVICE``:
CUDA tensors where a GPU is present, else CPU tensors inside ``cuda_code_path_on_cpu()``
(the dispatcher then sends them to the Triton kernel, run by the interpreter). Both go
through ``torch.ops.scaleinv.sgd_wd_``, as in the optimizer.

Exactness. The C++ kernel reproduces the reference update bit for bit in every dtype.
So does the Triton kernel where ``tl.fma`` rounds once (a GPU, triton >= 3.9's
interpreter). Where it rounds twice (the interpreters of triton 3.6-3.8, an interpreter
artifact), the difference from torch's fused arithmetic is not bounded by an ulp of the
stored value: where the update cancels most of the weight (w - lr*d ~ 0) one rounding of
the product lr*d is thousands of ulps of the result (measured with triton 3.6). What is
exact instead is the arithmetic that interpreter performs, every ``tl.fma(x, y, z)`` as
``x*y + z`` with two float32 roundings (``tests.devices.triton_fma_is_fused`` establishes
which of the two it is); :func:`sgd_wd_two_roundings` computes exactly that in torch,
and the Triton kernel must equal it bit for bit there. Statistics are float64 sums of
exact products; only their order differs between backends (1e-12 relative).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from scaleinv_kernels.ops import sgd_wd_kernel
from scaleinv_kernels.ops.registry import cuda_code_path_on_cpu
from scaleinv_kernels.ops.sgd_wd import sgd_wd_, sgd_wd_reference
from tests.devices import TRITON_DEVICE, triton_fma_is_fused
from tests.helpers import assert_bitwise, assert_rel, spy_wrap_triton

CPU = torch.device("cpu")
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton)]
ALL_BACKENDS = [*BACKENDS, "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1,), (7,), (1023,), (278011,), (), (0,), (33, 7), (4, 0, 3)]

HPARAMS = [
    dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.03, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
    dict(lr=0.2, weight_decay=3e-3, momentum=0.5, dampening=0.25, nesterov=False, maximize=True),
]


def device_of(backend: str) -> torch.device:
    """Where a backend's tensors live: the Triton kernel's on TRITON_DEVICE, the others'
    on the CPU."""
    return TRITON_DEVICE if backend == "triton" else CPU


def kernel_path(backend: str) -> contextlib.AbstractContextManager:
    """The block in which ``backend`` runs on ``device_of(backend)``: without a GPU the
    Triton kernel takes CPU tensors only on the CUDA code path."""
    if backend == "triton" and TRITON_DEVICE.type == "cpu":
        return cuda_code_path_on_cpu()
    return contextlib.nullcontext()


def run_op(backend: str, *args, **kwargs) -> None:
    """``sgd_wd_(*args, backend=backend)`` on the path that backend's kernel takes."""
    with kernel_path(backend):
        sgd_wd_(*args, backend=backend, **kwargs)


def expected_impl(backend: str) -> Callable:
    """The function whose result ``backend`` must reproduce bit for bit (module doc)."""
    if backend == "triton" and not triton_fma_is_fused():
        return sgd_wd_two_roundings
    return sgd_wd_reference


def sgd_wd_two_roundings(params, grads, momentum_buffers, fresh_buffers, stats, stats_rows,
                         segments, lr_tensor, segment_hparams, lr, weight_decay, momentum,
                         dampening, nesterov, maximize) -> None:
    """The Triton kernel's arithmetic with every ``tl.fma(x, y, z)`` computed as ``x*y + z``
    with two float32 roundings, as the interpreters of triton 3.6-3.8 do; arguments as
    :func:`sgd_wd_reference` (float64 params have no Triton kernel: the reference).

    The scalars reach the kernel as float32 (``lr`` as ``-lr``), a segment's (lr,
    weight_decay) and ``lr_tensor`` are rounded to float32 in the kernel, the momentum
    buffer is stored rounded but used unrounded, and each stored value is rounded once
    to the param dtype (round to nearest even)."""
    if params and params[0].dtype == torch.float64:
        return sgd_wd_reference(params, grads, momentum_buffers, fresh_buffers, stats,
                                stats_rows, segments, lr_tensor, segment_hparams, lr,
                                weight_decay, momentum, dampening, nesterov, maximize)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    fma = lambda x, y, z: x * y + z  # two roundings: torch runs mul and add separately
    mom, one_minus_damp = f32(momentum), f32(1.0 - dampening)
    if segment_hparams is not None:
        table = segment_hparams.cpu().float()  # per segment: (lr, wd) rounded to float32
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        k = segments[i]
        w = p.detach().cpu().float().reshape(k, -1)
        gm = g.detach().cpu().float().reshape(k, -1)
        has_buf = momentum != 0
        b_old = momentum_buffers[i].detach().cpu().float().reshape(k, -1) if has_buf else None
        new_w, new_b = torch.empty_like(w), torch.empty_like(w)
        for s in range(k):
            if segment_hparams is not None:
                neg_lr, wd = -table[offset + s, 0], table[offset + s, 1]
                use_wd = bool(wd != 0)
            else:
                neg_lr = -lr_tensor.detach().cpu().float() if lr_tensor is not None else f32(-lr)
                wd, use_wd = f32(weight_decay), weight_decay != 0
            d = -gm[s] if maximize else gm[s]
            if use_wd:
                d = fma(w[s], wd, d)
            if has_buf:
                b = d if fresh_buffers[i] else fma(d, one_minus_damp, b_old[s] * mom)
                new_b[s] = b
                d = fma(b, mom, d) if nesterov else b
            new_w[s] = fma(d, neg_lr, w[s])
        offset += k
        if has_buf:
            momentum_buffers[i].detach().copy_(new_b.reshape(p.shape).to(p.dtype))
        old = p.detach().cpu().double().reshape(k, -1)
        p.detach().copy_(new_w.reshape(p.shape).to(p.dtype))
        if stats.numel() and p.numel():
            w64, g64 = old, g.detach().cpu().double().reshape(k, -1)
            delta = p.detach().cpu().double().reshape(k, -1) - w64
            sums = torch.stack([(w64 * w64).sum(1), (g64 * g64).sum(1), (w64 * g64).sum(1),
                                (delta * delta).sum(1), (w64 * delta).sum(1),
                                (~torch.isfinite(g64)).sum(1).double()], dim=1)
            stats[stats_rows[i]:stats_rows[i] + k] += sums.to(stats.device)


def _inputs(shapes, dtype, seed, device=CPU):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(s, generator=gen).to(dtype).to(device)
    return [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]


def _run_both(backend, shapes, dtype, hp, *, fresh, segments=None, seed=0, lr_tensor=False,
              transform=None):
    """Run `backend` and what it must reproduce (``expected_impl``) on identical copies on
    the backend's device; return both results."""
    device = device_of(backend)
    params, grads, bufs = _inputs(shapes, dtype, seed, device)
    if transform is not None:
        params, grads, bufs = transform(params), transform(grads), transform(bufs)
    segments = segments or [1] * len(shapes)
    rows = list(itertools.accumulate([0] + segments[:-1]))
    n_rows = sum(segments) + 2  # spare rows must stay untouched
    out = {}
    for name in (backend, "expected"):
        p = [x.clone() for x in params]  # clone keeps the strides of transformed views
        b = [x.clone() for x in bufs] if hp["momentum"] else []
        stats = torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
        lr = torch.tensor(hp["lr"], device=device) if lr_tensor else hp["lr"]
        args = (p, grads, b, fresh if hp["momentum"] else [], stats, rows, segments)
        hps = (hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"],
               hp["maximize"])
        if name == backend:
            run_op(backend, *args, lr, *hps)
        else:
            expected_impl(backend)(*args, lr if lr_tensor else None, None,
                                   0.0 if lr_tensor else lr, *hps)
        out[name] = (p, b, stats)
    return out[backend], out["expected"]


def _stats_tolerance(dtype):
    # Every backend sums exact fp64 products (fp32 inputs) in fp64; only the order of
    # the additions differs. float64 params have rounded products.
    return 1e-12 if dtype != torch.float64 else 1e-10


def assert_stats_close(stats, expected, rtol, what):
    """Squared sums and counts within ``rtol`` relative. The signed sums w·g and w·Δ can
    cancel, so their error is measured against their Cauchy-Schwarz scale ‖w‖‖g‖ and
    ‖w‖‖Δ‖ (i.e. the cosines they imply are within ``rtol``)."""
    for col in (0, 1, 3, 5):
        assert_rel(stats[:, col], expected[:, col], rtol, f"{what} column {col}", atol=1e-300)
    for col, other in ((2, 1), (4, 3)):
        scale = (expected[:, 0] * expected[:, other]).sqrt()
        err = (stats[:, col] - expected[:, col]).abs()
        assert bool((err <= rtol * scale + 1e-300).all()), (
            f"{what} column {col}: max error/scale {(err / scale).nan_to_num().max():.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp_index", range(len(HPARAMS)))
def test_matches_reference(backend, dtype, hp_index):
    hp = HPARAMS[hp_index]
    fresh = [i % 2 == 0 for i in range(len(SHAPES))]
    (p, b, s), (rp, rb, rs) = _run_both(backend, SHAPES, dtype, hp, fresh=fresh,
                                        seed=hp_index)
    for i in range(len(SHAPES)):
        assert_bitwise(p[i], rp[i], f"{backend} param {i} {SHAPES[i]}")
        if hp["momentum"]:
            assert_bitwise(b[i], rb[i], f"{backend} buffer {i} {SHAPES[i]}")
    assert_stats_close(s, rs, _stats_tolerance(dtype), f"{backend} stats")
    assert torch.count_nonzero(s[len(SHAPES):]) == 0, "rows beyond the last segment written"


def _signed_zeros(tensors):
    """Every other element a zero with the sign of the random value it replaces, so params,
    grads and buffers (drawn independently) meet zeros of both signs in every pairing."""
    out = []
    for t in tensors:
        t = t.clone()
        flat = t.view(-1)
        flat[::2] = flat[::2].sign() * 0.0
        out.append(t)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp_index", range(len(HPARAMS)))
def test_signed_zeros_match_reference(backend, dtype, hp_index):
    """The sign of a zero result is part of the bitwise promise (e.g. -0.0 - lr·(+0.0))."""
    hp = HPARAMS[hp_index]
    shapes = [s for s in SHAPES if math.prod(s) < 10_000] + [(4099,)]  # several blocks
    fresh = [i % 2 == 1 for i in range(len(shapes))]
    (p, b, _), (rp, rb, _) = _run_both(backend, shapes, dtype, hp, fresh=fresh,
                                       seed=10 + hp_index, transform=_signed_zeros)
    zeros = torch.cat([t.reshape(-1)[t.reshape(-1) == 0].float().cpu() for t in rp])
    assert bool(zeros.signbit().any()) and not bool(zeros.signbit().all()), \
        "the results have zeros of both signs"
    for i in range(len(shapes)):
        assert_bitwise(p[i], rp[i], f"{backend} param {i} {shapes[i]}")
        if hp["momentum"]:
            assert_bitwise(b[i], rb[i], f"{backend} buffer {i} {shapes[i]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_lr_tensor_and_noncontiguous(backend):
    hp = HPARAMS[1]
    shapes = [(6, 35), (5, 9), (3,)]
    transpose = lambda ts: [t.t() if t.dim() == 2 else t for t in ts]
    (p, b, s), (rp, rb, rs) = _run_both(backend, shapes, torch.float32, hp,
                                        fresh=[False, True, False], segments=[5, 3, 1],
                                        lr_tensor=True, transform=transpose)
    for i in range(3):
        assert_bitwise(p[i], rp[i], f"param {i}")
        assert_bitwise(b[i], rb[i], f"buffer {i}")
    assert not p[0].is_contiguous(), "the user's strided view must be updated in place"
    assert_stats_close(s, rs, 1e-5, "segment stats")
    # segment sums add up to the whole-tensor sum
    start = transpose(_inputs(shapes, torch.float32, 0)[0])[0].double()
    whole = rp[0].double().cpu() - start
    assert_rel(s[:5, 3].sum().cpu(), whole.pow(2).sum(), 1e-5, "sum of segment delta^2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradients(backend):
    hp = HPARAMS[1]
    device = device_of(backend)
    params, grads, bufs = _inputs([(1023,)], torch.float32, 3, device)
    grads[0][[0, 5, 700]] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                         device=device)
    results = {}
    for name in (backend, "expected"):
        p, b = [params[0].clone()], [bufs[0].clone()]
        stats = torch.zeros(1, 6, dtype=torch.float64, device=device)
        args = (p, grads, b, [False], stats, [0], [1])
        hps = (hp["weight_decay"], hp["momentum"], hp["dampening"], False, False)
        if name == backend:
            run_op(backend, *args, hp["lr"], *hps)
        else:
            expected_impl(backend)(*args, None, None, hp["lr"], *hps)
        results[name] = (p[0], b[0], stats)
    assert_bitwise(results[backend][0], results["expected"][0], "param")
    assert_bitwise(results[backend][1], results["expected"][1], "buffer")
    assert results[backend][2][0, 5].item() == 3.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_raises_and_mutates_nothing(backend):
    device = device_of(backend)
    params, grads, bufs = _inputs([(7,), (5,)], torch.float32, 4, device)
    before = [x.clone() for x in params + bufs]
    stats = torch.zeros(2, 6, dtype=torch.float64, device=device)
    cases = [
        (dict(grads=[grads[0], grads[1][:4]]), ValueError, "param 1"),
        (dict(grads=[grads[0], grads[1].double()]), ValueError, "param 1"),
        (dict(grads=[grads[0], grads[1].to_sparse()]), ValueError, "param 1 has a sparse"),
        (dict(segments=[2, 1]), ValueError, "segments"),
        (dict(stats=torch.zeros(2, 5, dtype=torch.float64, device=device)), ValueError, "stats"),
        (dict(rows=[0, 5]), ValueError, "stats rows"),
        (dict(weight_decay=-1.0), ValueError, ">= 0"),
        (dict(nesterov=True, dampening=0.5), ValueError, "nesterov"),
        (dict(params=[params[0], params[1].double()], grads=[grads[0], grads[1].double()]),
         TypeError, "param 1"),
        # a tensor on another device than the params: 'meta' stands for one on a machine
        # with a single real device (the kernel would read it through a foreign pointer)
        (dict(lr=torch.tensor(0.1, device="meta")), ValueError,
         f"lr_tensor is on meta but the params are on {device}"),
        (dict(stats=torch.zeros(2, 6, dtype=torch.float64, device="meta")), ValueError,
         "stats is on meta"),
        (dict(lr=torch.tensor([0.1, 0.2], device=device)), ValueError, "one element"),
    ]
    for change, error, text in cases:
        args = dict(params=params, grads=grads, bufs=bufs, fresh=[False, False], stats=stats,
                    rows=[0, 1], segments=[1, 1], lr=0.1, weight_decay=0.0, momentum=0.9,
                    dampening=0.0, nesterov=False)
        args.update(change)
        with pytest.raises(error, match=text):
            run_op(backend, args["params"], args["grads"], args["bufs"], args["fresh"],
                   args["stats"], args["rows"], args["segments"], args["lr"],
                   args["weight_decay"], args["momentum"], args["dampening"],
                   args["nesterov"], False)
        for x, y in zip(params + bufs, before):
            assert_bitwise(x, y, f"mutated after {change}")
        assert torch.count_nonzero(stats) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rejects_an_lr_tensor_on_another_device(backend):
    """The dispatcher itself (torch.ops, no Python wrapper in front) refuses an lr_tensor
    that is not on the params' device before anything is written: through the fake kernel
    when the stray tensor is a meta tensor, through the kernel otherwise."""
    device = device_of(backend)
    params, grads, bufs = _inputs([(7,)], torch.float32, 8, device)
    before = params[0].clone()
    stats = torch.zeros(1, 6, dtype=torch.float64, device=device)
    with kernel_path(backend), pytest.raises(ValueError, match="lr_tensor is on meta"):
        torch.ops.scaleinv.sgd_wd_(params, grads, bufs, [False], stats, [0], [1],
                                   torch.tensor(0.1, device="meta"), None, 0.0, 0.0, 0.9,
                                   0.0, False, False)
    assert_bitwise(params[0], before, "param after the refused call")
    assert torch.count_nonzero(stats) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_must_be_the_kernel_of_the_tensors_device(backend):
    """Both kernels are reached through the dispatcher, where the device picks the kernel:
    asking for the other one is an error, not a silent switch."""
    other = "cpp" if backend == "triton" else "triton"
    device = device_of(backend)
    params, grads, _ = _inputs([(5,)], torch.float32, 9, device)
    stats = torch.zeros(1, 6, dtype=torch.float64, device=device)
    with kernel_path(backend), pytest.raises(ValueError, match=f"backend '{other}'"):
        sgd_wd_(params, grads, [], [], stats, [0], [1], 0.1, 0.0, 0.0, 0.0, False, False,
                backend=other)


@pytest.mark.triton
def test_triton_without_statistics():
    """Empty stats: the kernel is launched with TRACK_STATS=False and the update is the
    one it makes with statistics."""
    launches = []

    def spy(kernel, grid, *args, **kwargs):
        launches.append(kwargs)
        return launch(kernel, grid, *args, **kwargs)

    launch = sgd_wd_kernel.launch
    hp = HPARAMS[2]
    params, grads, bufs = _inputs([(1023,), (33, 7)], torch.float32, 11, TRITON_DEVICE)
    out = {}
    for name, stats in (("without", torch.empty(0, dtype=torch.float64)),
                        ("with", torch.zeros(2, 6, dtype=torch.float64,
                                             device=TRITON_DEVICE))):
        p, b = [x.clone() for x in params], [x.clone() for x in bufs]
        with contextlib.ExitStack() as stack:
            stack.enter_context(kernel_path("triton"))
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(sgd_wd_kernel, "launch", spy)
            sgd_wd_(p, grads, b, [True, False], stats, [0, 1], [1, 1], hp["lr"],
                    hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"],
                    hp["maximize"], backend="triton")
        out[name] = (p, b)
    assert [k["TRACK_STATS"] for k in launches] == [False, True]
    expected = [x.clone() for x in params], [x.clone() for x in bufs]
    expected_impl("triton")(expected[0], grads, expected[1], [True, False],
                            torch.empty(0, dtype=torch.float64), [0, 1], [1, 1], None, None,
                            hp["lr"], hp["weight_decay"], hp["momentum"], hp["dampening"],
                            hp["nesterov"], hp["maximize"])
    for i in range(2):
        assert_bitwise(out["without"][0][i], out["with"][0][i], f"param {i}")
        assert_bitwise(out["without"][1][i], out["with"][1][i], f"buffer {i}")
        assert_bitwise(out["without"][0][i], expected[0][i], f"param {i} vs expected")
        assert_bitwise(out["without"][1][i], expected[1][i], f"buffer {i} vs expected")


@pytest.mark.triton
def test_triton_launch_goes_through_wrap_triton(monkeypatch):
    """The launch asks torch.library.wrap_triton for the kernel (torch 2.11's refuses an
    interpreted kernel, which is then launched directly) and the kernel runs."""
    seen = spy_wrap_triton(monkeypatch)
    params, grads, _ = _inputs([(100,)], torch.float32, 12, TRITON_DEVICE)
    before = params[0].clone()
    run_op("triton", params, grads, [], [], torch.empty(0, dtype=torch.float64), [0], [1],
           0.1, 0.0, 0.0, 0.0, False, False)
    assert seen == [sgd_wd_kernel.sgd_wd_kernel]
    assert not torch.equal(params[0], before)


# ---- per-segment (lr, weight_decay) ---------------------------------------------------
# Several params with different segment counts; a 0-d param; a zero-numel param that still
# owns its 3 (unused) table rows; segments longer than the Triton CHUNK (16384).
SEG_SHAPES = [(6, 35), (0, 4), (4, 9), (), (2, 20000), (3,)]
SEG_COUNTS = [6, 3, 4, 1, 2, 1]


def _segment_table(seed, device):
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(sum(SEG_COUNTS), 2, generator=gen, dtype=torch.float64)
    table[:, 0] *= 0.3
    table[:, 1] *= 0.05
    table[[0, 5, 9, 14, 15], 1] = 0.0  # weight decay off in some segments (add skipped)
    table[10, 0] = 0.0  # and a zero lr
    return table.to(device)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hp_index", [0, 2, 3])  # no momentum / nesterov / dampening+maximize
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_segment_hparams_equal_separate_calls_per_segment(backend, dtype, hp_index):
    """One call with segment_hparams == one call per segment slice with scalar lr_s, wd_s
    (params, momentum buffers and statistics, bit for bit)."""
    hp = HPARAMS[hp_index]
    device = device_of(backend)
    params, grads, bufs = _inputs(SEG_SHAPES, dtype, 10 + hp_index, device)
    # Where the weight decay is 0 the add must be skipped (g + 0*w is not g): an inf
    # weight would turn into NaN, a -0.0 grad into +0.0 (seen by the bit comparison).
    params[4].view(-1)[3] = float("inf")
    grads[4].view(-1)[:3] = torch.tensor([-0.0, 1.0, -0.0], dtype=dtype, device=device)
    table = _segment_table(hp_index, device)
    fresh = [i % 2 == 1 for i in range(len(SEG_SHAPES))] if hp["momentum"] else []
    rows = list(itertools.accumulate([0] + SEG_COUNTS[:-1]))
    n_rows = sum(SEG_COUNTS)
    mom = bool(hp["momentum"])

    p1, b1 = [x.clone() for x in params], [x.clone() for x in bufs] if mom else []
    s1 = torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
    run_op(backend, p1, grads, b1, fresh, s1, rows, SEG_COUNTS, 123.0, 7.0, hp["momentum"],
           hp["dampening"], hp["nesterov"], hp["maximize"],
           segment_hparams=table)  # the scalars 123.0 / 7.0 must be ignored

    p2, b2 = [x.clone() for x in params], [x.clone() for x in bufs] if mom else []
    s2 = torch.zeros(n_rows, 6, dtype=torch.float64, device=device)
    for i, k in enumerate(SEG_COUNTS):
        pieces = lambda t, k=k: list(t.view(k, -1).unbind(0))  # contiguous segment views
        for s, (pp, gg) in enumerate(zip(pieces(p2[i]), pieces(grads[i]))):
            lr_s, wd_s = table[rows[i] + s].tolist()
            run_op(backend, [pp], [gg], [pieces(b2[i])[s]] if mom else [], fresh[i:i + 1],
                   s2, [rows[i] + s], [1], lr_s, wd_s, hp["momentum"], hp["dampening"],
                   hp["nesterov"], hp["maximize"])
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    for i in range(len(SEG_SHAPES)):
        assert_bitwise(p1[i].view(bits), p2[i].view(bits), f"{backend} param {i}")
        if mom:
            assert_bitwise(b1[i].view(bits), b2[i].view(bits), f"{backend} buffer {i}")
    assert_bitwise(s1, s2, f"{backend} stats")
    assert p1[4].view(-1)[3].item() == float("inf"), "0 * inf added where wd == 0"
    assert torch.count_nonzero(s1[3:6]) > 0 and torch.count_nonzero(s1[6:9]) == 0
    # the table really is used: not equal to a plain call with one lr for everything
    assert not torch.equal(p1[0], params[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_hparams_backend_matches_reference_low_precision(backend):
    """bf16/fp16 with a table: every backend equals what it must reproduce (the
    reference, see the module doc) bit for bit."""
    device = device_of(backend)
    table = _segment_table(1, device)
    rows = list(itertools.accumulate([0] + SEG_COUNTS[:-1]))
    for dtype in (torch.bfloat16, torch.float16):
        params, grads, bufs = _inputs(SEG_SHAPES, dtype, 20, device)
        out = {}
        for name in (backend, "expected"):
            p, b = [x.clone() for x in params], [x.clone() for x in bufs]
            stats = torch.zeros(sum(SEG_COUNTS), 6, dtype=torch.float64, device=device)
            args = (p, grads, b, [False] * len(p), stats, rows, SEG_COUNTS)
            if name == backend:
                run_op(backend, *args, 0.0, 0.0, 0.9, 0.0, True, False, segment_hparams=table)
            else:
                expected_impl(backend)(*args, None, table, 0.0, 0.0, 0.9, 0.0, True, False)
            out[name] = (p, b, stats)
        for i in range(len(SEG_SHAPES)):
            assert_bitwise(out[backend][0][i], out["expected"][0][i], f"{dtype} param {i}")
            assert_bitwise(out[backend][1][i], out["expected"][1][i], f"{dtype} buffer {i}")
        assert_stats_close(out[backend][2], out["expected"][2], 1e-12, f"{dtype} stats")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_segment_hparams_bad_input_raises_and_mutates_nothing(backend):
    device = device_of(backend)
    params, grads, bufs = _inputs([(6,), (0,), (5,)], torch.float32, 4, device)
    before = [x.clone() for x in params + bufs]
    stats = torch.zeros(6, 6, dtype=torch.float64, device=device)
    good = torch.full((6, 2), 0.1, dtype=torch.float64, device=device)  # segments [3, 2, 1]

    def bad(row, col, value):
        t = good.clone()
        t[row, col] = value
        return t

    cases = [
        (good.float(), TypeError, "segment_hparams must be float64"),
        (good[:5], ValueError, r"shape \[sum\(segments\), 2\] = \[6, 2\]"),
        (torch.zeros(6, 3, dtype=torch.float64, device=device), ValueError, "shape"),
        (good.reshape(-1), ValueError, "shape"),
        (bad(5, 0, -0.1), ValueError, r"row 5 \(param 2, segment 0\).*finite and >= 0"),
        (bad(4, 1, float("nan")), ValueError, r"row 4 \(param 1, segment 1\)"),
        (bad(1, 1, -1e-3), ValueError, r"row 1 \(param 0, segment 1\)"),
        (bad(0, 0, float("inf")), ValueError, "finite"),
    ]
    # The value checks need the values on the host, i.e. a sync on CUDA: on CUDA tensors
    # (the Triton kernel on a GPU) they are not made, on purpose (module doc of the op).
    values_checked = device.type == "cpu"
    if not values_checked:
        cases = cases[:4]
    # a table on another device ('meta' where there is only one real device)
    cases.append((good.to("meta"), ValueError, "segment_hparams is on meta"))
    for table, error, text in cases:
        with pytest.raises(error, match=text):
            run_op(backend, params, grads, bufs, [False] * 3, stats, [0, 3, 5], [3, 2, 1],
                   0.1, 0.0, 0.9, 0.0, False, False, segment_hparams=table)
        for x, y in zip(params + bufs, before):
            assert_bitwise(x, y, f"mutated by segment_hparams {table.shape} {table.dtype}")
        assert torch.count_nonzero(stats) == 0
    if not values_checked:  # CUDA: a negative lr is applied as given, as torch's would be
        table = good.clone()
        table[:, 0] = -0.1
        p = [x.clone() for x in params]
        run_op(backend, p, grads, [], [], stats, [0, 3, 5], [3, 2, 1], 0.0, 0.0, 0.0, 0.0,
               False, False, segment_hparams=table)
        for i in (0, 2):
            d = grads[i].add(params[i], alpha=0.1)
            torch.testing.assert_close(p[i], params[i] + 0.1 * d, rtol=1e-6, atol=1e-6)


def test_reference_equals_torch_sgd_single_tensor():
    """The reference issues torch.optim.SGD's own ops, so fp32 results are identical."""
    params, grads, _ = _inputs([(1023,), (7, 3)], torch.float32, 5, device="cpu")
    for hp in HPARAMS:
        ours = [p.clone() for p in params]
        theirs = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.SGD(theirs, foreach=False, **hp)
        bufs = [torch.empty_like(p) for p in params] if hp["momentum"] else []
        for step in range(3):
            for t, g in zip(theirs, grads):
                t.grad = g * (step + 1)
            opt.step()
            sgd_wd_reference(ours, [g * (step + 1) for g in grads], bufs,
                             [step == 0] * len(bufs), torch.empty(0, dtype=torch.float64),
                             [0, 0], [1, 1], None, None, hp["lr"], hp["weight_decay"],
                             hp["momentum"], hp["dampening"], hp["nesterov"], hp["maximize"])
        for o, t in zip(ours, theirs):
            assert_bitwise(o, t.detach(), f"reference vs SGD {hp}")


def test_opcheck_cpu():
    params, grads, bufs = _inputs([(7,), (33,)], torch.float32, 6, device="cpu")
    stats = torch.zeros(2, 6, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.scaleinv.sgd_wd_.default,
        (params, grads, bufs, [True, False], stats, [0, 1], [1, 1], None, None, 0.1, 5e-4, 0.9,
         0.0, False, False))
    params, grads, bufs = _inputs([(6, 5), (0, 3), (4,)], torch.float32, 7, device="cpu")
    table = torch.tensor([[0.1, 0.0], [0.05, 1e-2], [0.2, 3e-3], [0.0, 0.0], [0.3, 1e-3],
                          [0.01, 0.5]], dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.scaleinv.sgd_wd_.default,
        (params, grads, bufs, [False, True, False], torch.zeros(6, 6, dtype=torch.float64),
         [0, 3, 5], [3, 2, 1], None, table, 0.0, 0.0, 0.9, 0.0, True, False))


@pytest.mark.triton
def test_opcheck_triton_kernel():
    """The op with its Triton kernel (on TRITON_DEVICE) passes opcheck too: schema
    (mutations as declared), fake kernel, and AOT dispatch, which replays the Triton
    kernel on functionalized copies."""
    params, grads, bufs = _inputs([(7,), (33,)], torch.float32, 6, TRITON_DEVICE)
    stats = torch.zeros(2, 6, dtype=torch.float64, device=TRITON_DEVICE)
    lr = torch.tensor(0.1, device=TRITON_DEVICE)
    with kernel_path("triton"):
        torch.library.opcheck(
            torch.ops.scaleinv.sgd_wd_.default,
            (params, grads, bufs, [True, False], stats, [0, 1], [1, 1], lr, None, 0.0, 5e-4,
             0.9, 0.0, False, False))


def test_compiled_function_calling_the_op_has_no_graph_break():
    """torch.compile sees the op as one node (fake kernel, declared mutations): a
    function calling it compiles to one graph, and the compiled call updates like the
    eager one."""
    def step(params, grads, bufs, stats, lr):
        torch.ops.scaleinv.sgd_wd_(params, grads, bufs, [False, False], stats, [0, 1], [1, 1],
                                   lr, None, 0.0, 1e-3, 0.9, 0.0, True, False)
        return stats[:, 0].sum()

    params, grads, bufs = _inputs([(7,), (5, 3)], torch.float32, 13)
    lr = torch.tensor(0.05)
    explained = torch._dynamo.explain(step)([p.clone() for p in params], grads,
                                            [b.clone() for b in bufs],
                                            torch.zeros(2, 6, dtype=torch.float64), lr)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        p, b = [x.clone() for x in params], [x.clone() for x in bufs]
        stats = torch.zeros(2, 6, dtype=torch.float64)
        total = fn(p, grads, b, stats, lr)
        out[name] = (p, b, stats, total)
    for i in range(2):
        assert_bitwise(out["compiled"][0][i], out["eager"][0][i], f"param {i}")
        assert_bitwise(out["compiled"][1][i], out["eager"][1][i], f"buffer {i}")
    assert_bitwise(out["compiled"][2], out["eager"][2], "stats")
    assert float(out["compiled"][3]) == float(out["eager"][3]) > 0


ROOT = Path(__file__).resolve().parents[2]  # the AOT scripts import tests.aot

AOT_SCRIPT = r"""
import json, sys, triton.language as tl
from scaleinv_kernels.ops import sgd_wd_kernel as m
from tests.aot import compile_for, ptxas_usage
arch = int(sys.argv[1])
sig = {"param_ptrs": "*i64", "grad_ptrs": "*i64", "buf_ptrs": "*i64", "fresh_ptr": "*i8",
       "work_ptr": "*i64", "stats_ptr": "*fp64", "lr_ptr": "*fp32", "hparams_ptr": "*fp64",
       "neg_lr": "fp32",
       "weight_decay": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32"}
out = []
for dtype in (tl.float32, tl.bfloat16, tl.float16):
    # (momentum, stats, lr tensor, per-segment lr/wd as launched: HAS_WD off)
    for mom, stats, lrt, seg in ((True, True, False, False), (False, False, True, False),
                                 (True, True, False, True)):
        consts = dict(DTYPE=dtype, HAS_WD=not seg, HAS_MOMENTUM=mom, NESTEROV=mom,
                      MAXIMIZE=False, TRACK_STATS=stats, LR_FROM_TENSOR=lrt, PER_SEGMENT=seg,
                      BLOCK=m.BLOCK)
        k = compile_for(m.sgd_wd_kernel, sig, consts, arch, num_warps=8,
                        enable_fp_fusion=False)
        regs, spills = ptxas_usage(k.asm["ptx"], arch)
        out.append(dict(dtype=str(dtype), momentum=mom, stats=stats, per_segment=seg,
                        registers=regs,
                        spill_bytes=spills, ptx_fma=k.asm["ptx"].count("fma.rn.f32"),
                        cubin=len(k.asm["cubin"])))
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", [90, 80])
def test_triton_kernel_compiles_ahead_of_time(arch):
    """Compile for sm_90/sm_80 without a GPU: catches what the interpreter lets through."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(arch)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    variants = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(variants) == 9
    assert sum(v["per_segment"] for v in variants) == 3
    for v in variants:
        print(f"sm_{arch} {v}")  # registers/spills in the test log (pytest -s / -rA)
        assert v["cubin"] > 0 and v["ptx_fma"] > 0
        assert v["spill_bytes"] == 0, f"register spills in {v}"
