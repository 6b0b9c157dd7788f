"""scaleinv::sgd_wd_ — every backend against the plain-torch reference.

The C++ kernel and the Triton kernel (under TRITON_INTERPRET=1 on CPU tensors when no
GPU is present) must reproduce the reference update bit for bit in every dtype, and the
statistics within 1e-5 relative of the float64 sums.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaleinv_kernels.ops.sgd_wd import sgd_wd_, sgd_wd_reference
from tests.helpers import assert_bitwise, assert_rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cpp", "triton"] if DEVICE == "cpu" else ["triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1,), (7,), (1023,), (278011,), (), (0,), (33, 7), (4, 0, 3)]

HPARAMS = [
    dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.03, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
    dict(lr=0.2, weight_decay=3e-3, momentum=0.5, dampening=0.25, nesterov=False, maximize=True),
]


def _inputs(shapes, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(s, generator=gen).to(dtype).to(device)
    return [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]


def _run_both(backend, shapes, dtype, hp, *, fresh, segments=None, seed=0, lr_tensor=False,
              transform=None):
    """Run `backend` and the reference on identical copies; return both results."""
    params, grads, bufs = _inputs(shapes, dtype, seed)
    if transform is not None:
        params, grads, bufs = transform(params), transform(grads), transform(bufs)
    segments = segments or [1] * len(shapes)
    rows = list(itertools.accumulate([0] + segments[:-1]))
    n_rows = sum(segments) + 2  # spare rows must stay untouched
    out = {}
    for name in (backend, "reference"):
        p = [x.clone() for x in params]  # clone keeps the strides of transformed views
        b = [x.clone() for x in bufs] if hp["momentum"] else []
        stats = torch.zeros(n_rows, 6, dtype=torch.float64, device=DEVICE)
        lr = torch.tensor(hp["lr"], device=DEVICE) if lr_tensor else hp["lr"]
        sgd_wd_(p, grads, b, fresh if hp["momentum"] else [], stats, rows, segments, lr,
                hp["weight_decay"], hp["momentum"], hp["dampening"], hp["nesterov"],
                hp["maximize"], backend=name)
        out[name] = (p, b, stats)
    return out[backend], out["reference"]


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
    whole = (rp[0].double() - transpose(_inputs(shapes, torch.float32, 0)[0])[0].double())
    assert_rel(s[:5, 3].sum(), whole.pow(2).sum(), 1e-5, "sum of segment delta^2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradients(backend):
    hp = HPARAMS[1]
    params, grads, bufs = _inputs([(1023,)], torch.float32, 3)
    grads[0][[0, 5, 700]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    results = {}
    for name in (backend, "reference"):
        p, b = [params[0].clone()], [bufs[0].clone()]
        stats = torch.zeros(1, 6, dtype=torch.float64, device=DEVICE)
        sgd_wd_(p, grads, b, [False], stats, [0], [1], hp["lr"], hp["weight_decay"],
                hp["momentum"], hp["dampening"], False, False, backend=name)
        results[name] = (p[0], b[0], stats)
    assert_bitwise(results[backend][0], results["reference"][0], "param")
    assert_bitwise(results[backend][1], results["reference"][1], "buffer")
    assert results[backend][2][0, 5].item() == 3.0


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_bad_input_raises_and_mutates_nothing(backend):
    params, grads, bufs = _inputs([(7,), (5,)], torch.float32, 4)
    before = [x.clone() for x in params + bufs]
    stats = torch.zeros(2, 6, dtype=torch.float64, device=DEVICE)
    cases = [
        (dict(grads=[grads[0], grads[1][:4]]), ValueError, "param 1"),
        (dict(grads=[grads[0], grads[1].double()]), ValueError, "param 1"),
        (dict(segments=[2, 1]), ValueError, "segments"),
        (dict(stats=torch.zeros(2, 5, dtype=torch.float64, device=DEVICE)), ValueError, "stats"),
        (dict(rows=[0, 5]), ValueError, "stats rows"),
        (dict(weight_decay=-1.0), ValueError, ">= 0"),
        (dict(nesterov=True, dampening=0.5), ValueError, "nesterov"),
        (dict(params=[params[0], params[1].double()], grads=[grads[0], grads[1].double()]),
         TypeError, "param 1"),
    ]
    for change, error, text in cases:
        args = dict(params=params, grads=grads, bufs=bufs, fresh=[False, False], stats=stats,
                    rows=[0, 1], segments=[1, 1], lr=0.1, weight_decay=0.0, momentum=0.9,
                    dampening=0.0, nesterov=False)
        args.update(change)
        with pytest.raises(error, match=text):
            sgd_wd_(args["params"], args["grads"], args["bufs"], args["fresh"], args["stats"],
                    args["rows"], args["segments"], args["lr"], args["weight_decay"],
                    args["momentum"], args["dampening"], args["nesterov"], False,
                    backend=backend)
        for x, y in zip(params + bufs, before):
            assert_bitwise(x, y, f"mutated after {change}")
        assert torch.count_nonzero(stats) == 0


# ---- per-segment (lr, weight_decay) ---------------------------------------------------
# Several params with different segment counts; a 0-d param; a zero-numel param that still
# owns its 3 (unused) table rows; segments longer than the Triton CHUNK (16384).
SEG_SHAPES = [(6, 35), (0, 4), (4, 9), (), (2, 20000), (3,)]
SEG_COUNTS = [6, 3, 4, 1, 2, 1]


def _segment_table(seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(sum(SEG_COUNTS), 2, generator=gen, dtype=torch.float64)
    table[:, 0] *= 0.3
    table[:, 1] *= 0.05
    table[[0, 5, 9, 14, 15], 1] = 0.0  # weight decay off in some segments (add skipped)
    table[10, 0] = 0.0  # and a zero lr
    return table.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hp_index", [0, 2, 3])  # no momentum / nesterov / dampening+maximize
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_segment_hparams_equal_separate_calls_per_segment(backend, dtype, hp_index):
    """One call with segment_hparams == one call per segment slice with scalar lr_s, wd_s
    (params, momentum buffers and statistics, bit for bit)."""
    hp = HPARAMS[hp_index]
    params, grads, bufs = _inputs(SEG_SHAPES, dtype, 10 + hp_index)
    # Where the weight decay is 0 the add must be skipped (g + 0*w is not g): an inf
    # weight would turn into NaN, a -0.0 grad into +0.0 (seen by the bit comparison).
    params[4].view(-1)[3] = float("inf")
    grads[4].view(-1)[:3] = torch.tensor([-0.0, 1.0, -0.0], dtype=dtype)
    table = _segment_table(hp_index)
    fresh = [i % 2 == 1 for i in range(len(SEG_SHAPES))] if hp["momentum"] else []
    rows = list(itertools.accumulate([0] + SEG_COUNTS[:-1]))
    n_rows = sum(SEG_COUNTS)
    mom = bool(hp["momentum"])

    p1, b1 = [x.clone() for x in params], [x.clone() for x in bufs] if mom else []
    s1 = torch.zeros(n_rows, 6, dtype=torch.float64, device=DEVICE)
    sgd_wd_(p1, grads, b1, fresh, s1, rows, SEG_COUNTS, 123.0, 7.0, hp["momentum"],
            hp["dampening"], hp["nesterov"], hp["maximize"], backend=backend,
            segment_hparams=table)  # the scalars 123.0 / 7.0 must be ignored

    p2, b2 = [x.clone() for x in params], [x.clone() for x in bufs] if mom else []
    s2 = torch.zeros(n_rows, 6, dtype=torch.float64, device=DEVICE)
    for i, k in enumerate(SEG_COUNTS):
        pieces = lambda t, k=k: list(t.view(k, -1).unbind(0))  # contiguous segment views
        for s, (pp, gg) in enumerate(zip(pieces(p2[i]), pieces(grads[i]))):
            lr_s, wd_s = table[rows[i] + s].tolist()
            sgd_wd_([pp], [gg], [pieces(b2[i])[s]] if mom else [], fresh[i:i + 1], s2,
                    [rows[i] + s], [1], lr_s, wd_s, hp["momentum"], hp["dampening"],
                    hp["nesterov"], hp["maximize"], backend=backend)
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
    """bf16/fp16 with a table: every backend equals the reference bit for bit."""
    table = _segment_table(1)
    rows = list(itertools.accumulate([0] + SEG_COUNTS[:-1]))
    for dtype in (torch.bfloat16, torch.float16):
        params, grads, bufs = _inputs(SEG_SHAPES, dtype, 20)
        out = {}
        for name in (backend, "reference"):
            p, b = [x.clone() for x in params], [x.clone() for x in bufs]
            stats = torch.zeros(sum(SEG_COUNTS), 6, dtype=torch.float64, device=DEVICE)
            sgd_wd_(p, grads, b, [False] * len(p), stats, rows, SEG_COUNTS, 0.0, 0.0, 0.9, 0.0,
                    True, False, backend=name, segment_hparams=table)
            out[name] = (p, b, stats)
        for i in range(len(SEG_SHAPES)):
            assert_bitwise(out[backend][0][i], out["reference"][0][i], f"{dtype} param {i}")
            assert_bitwise(out[backend][1][i], out["reference"][1][i], f"{dtype} buffer {i}")
        assert_stats_close(out[backend][2], out["reference"][2], 1e-12, f"{dtype} stats")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_segment_hparams_bad_input_raises_and_mutates_nothing(backend):
    params, grads, bufs = _inputs([(6,), (0,), (5,)], torch.float32, 4)
    before = [x.clone() for x in params + bufs]
    stats = torch.zeros(6, 6, dtype=torch.float64, device=DEVICE)
    good = torch.full((6, 2), 0.1, dtype=torch.float64, device=DEVICE)  # segments [3, 2, 1]

    def bad(row, col, value):
        t = good.clone()
        t[row, col] = value
        return t

    cases = [
        (good.float(), TypeError, "segment_hparams must be float64"),
        (good[:5], ValueError, r"shape \[sum\(segments\), 2\] = \[6, 2\]"),
        (torch.zeros(6, 3, dtype=torch.float64, device=DEVICE), ValueError, "shape"),
        (good.reshape(-1), ValueError, "shape"),
        (bad(5, 0, -0.1), ValueError, r"row 5 \(param 2, segment 0\).*finite and >= 0"),
        (bad(4, 1, float("nan")), ValueError, r"row 4 \(param 1, segment 1\)"),
        (bad(1, 1, -1e-3), ValueError, r"row 1 \(param 0, segment 1\)"),
        (bad(0, 0, float("inf")), ValueError, "finite"),
    ]
    if backend != "cpp":  # the dispatcher sends a meta tensor elsewhere before C++ sees it
        cases.append((good.to("meta"), ValueError, "segment_hparams is on meta"))
    for table, error, text in cases:
        with pytest.raises(error, match=text):
            sgd_wd_(params, grads, bufs, [False] * 3, stats, [0, 3, 5], [3, 2, 1], 0.1, 0.0,
                    0.9, 0.0, False, False, backend=backend, segment_hparams=table)
        for x, y in zip(params + bufs, before):
            assert_bitwise(x, y, f"mutated by segment_hparams {table.shape} {table.dtype}")
        assert torch.count_nonzero(stats) == 0


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


ROOT = Path(__file__).resolve().parents[2]  # the AOT scripts import tests.aot

AOT_SCRIPT = r"""
import json, sys, triton.language as tl
from scaleinv_kernels.ops import sgd_wd as m
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
        k = compile_for(m._sgd_wd_kernel, sig, consts, arch, num_warps=8,
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
