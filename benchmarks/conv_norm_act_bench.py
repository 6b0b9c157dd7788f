"""The fused input layer (conv → BatchNorm → ReLU → MaxPool2d(2)), forward + backward,
against the two-op path it replaces and against eager torch.

    python benchmarks/conv_norm_act_bench.py [--repeats 5] [--min-time 0.3] [--cases m64 ...]

Per case (an ensemble's first layer: M members, 1 input channel, 16 output channels per
member, 3×3, padding 1, batch 64, 28×28, training mode, affine=False, running statistics
updated; the input needs no gradient) it times, interleaved with a triad ``a = b + s·c``
over arrays of the conv output's size (``sgd_wd_cases``, medians of the repeats):

* ``fused``: ``scaleinv_kernels.ops.conv_bn_act_pool`` forward + ``autograd.grad`` of
  the conv weight (``scaleinv::conv_bn_act_pool``, C++);
* ``two ops``: ``direct_conv2d`` → ``bn_act_pool`` (what the ensemble ran before);
* ``torch``: grouped ``F.conv2d`` → ``F.batch_norm`` → ``relu_`` → ``F.max_pool2d``;
* ``direct_conv2d``: the convolution of ``two ops`` alone (forward + weight gradient).

``--isa avx2,default`` runs the cases once per instruction set in child processes; the
tables also go to a JSON file (``isa_runs.py``; default
``benchmarks/results/conv_norm_act_bench.json``).

Counted minimal traffic per conv-output element E (fp32, C_in = 1, C_out = 16 per group,
so x has E/16 elements): forward reads x twice (moments, then the pooled pass; 0.5 B) and
writes out (E/4 floats) and the index (E/4 bytes): 1.75 B; backward reads grad_out, out,
the index and x: 2.5 B; 4.25 B per element in all. ``×floor`` = time / (counted bytes /
triad bandwidth). The op does ~110 flops per pooled window besides (the conv at four
corners, the recomputed patch at the argmax, the moments), so on this CPU it is bound
by arithmetic, not by that traffic; the column says how far.
"""

from __future__ import annotations

import argparse
import sys

import isa_runs
import torch
import torch.nn.functional as F
from bench_report import render_table
from sgd_wd_cases import Triad, interleaved  # (benchmarks/ is on sys.path)

from scaleinv_kernels._extension import extension_loaded
from scaleinv_kernels.cpu_memory import retain_freed_memory
from scaleinv_kernels.ops.conv_norm_act import conv_bn_act_pool
from scaleinv_kernels.ops.direct_conv import direct_conv2d
from scaleinv_kernels.ops.norm_act import bn_act_pool

CASES = {  # key: (title, members)
    "m64": ("M=64 members, 1→16 ch, 28x28", 64),
    "m8": ("M=8 members, 1→16 ch, 28x28", 8),
}
BATCH, CO, HW = 64, 16, 28
BYTES_PER_ELEMENT = 1.75 + 2.5
VARIANTS = ("fused", "two ops", "torch", "direct_conv2d")
MOMENTUM, EPS = 0.1, 1e-5


class Step:
    """One forward + backward (grad of the conv weight) of a variant."""

    def __init__(self, variant: str, members: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.m = members
        self.x = torch.rand(BATCH, members, HW, HW, generator=gen)
        self.w = (torch.randn(members * CO, 1, 3, 3, generator=gen) / 3).requires_grad_()
        self.rm = torch.zeros(members * CO)
        self.rv = torch.ones(members * CO)
        self.go = torch.randn(BATCH, members * CO, HW // 2, HW // 2, generator=gen)
        self.go_conv = torch.randn(BATCH, members * CO, HW, HW, generator=gen)
        self.variant = variant

    def forward(self) -> torch.Tensor:
        if self.variant == "fused":
            return conv_bn_act_pool(self.x, self.w, self.m, (1, 1), None, None, self.rm,
                                    self.rv, training=True, momentum=MOMENTUM, eps=EPS)
        if self.variant == "direct_conv2d":
            return direct_conv2d(self.x, self.w, None, self.m, (1, 1))
        if self.variant == "two ops":
            y = direct_conv2d(self.x, self.w, None, self.m, (1, 1))
            return bn_act_pool(y, None, None, self.rm, self.rv, training=True,
                               momentum=MOMENTUM, eps=EPS)
        y = F.conv2d(self.x, self.w, None, 1, 1, 1, self.m)
        y = torch.relu_(F.batch_norm(y, self.rm, self.rv, None, None, True, MOMENTUM, EPS))
        return F.max_pool2d(y, 2)

    def __call__(self) -> torch.Tensor:
        go = self.go_conv if self.variant == "direct_conv2d" else self.go
        (gw,) = torch.autograd.grad(self.forward(), self.w, go)
        return gw


def routed_apart(step: Step) -> int:
    """Pooled windows whose gradient the fused op and the two-op path route differently
    (the raw ops' local indices and outputs, same inputs as the timed steps)."""
    with torch.no_grad():
        out_f, _, _, idx_f, _ = torch.ops.scaleinv.conv_bn_act_pool(
            step.x, step.w, step.m, [1, 1], None, None, None, None, EPS, True)
        y = direct_conv2d(step.x, step.w, None, step.m, (1, 1))
        out_t, _, _, idx_t = torch.ops.scaleinv.bn_act_pool(y, None, None, None, None, EPS,
                                                            True, 2)
    # another argmax where the window's output is positive, or one path's output positive
    # and the other's zero (a pre-activation at ReLU's kink: the same index, but one path
    # passes the gradient and the other drops it)
    pos_f, pos_t = out_f > 0, out_t > 0
    return int((((idx_f != idx_t) & (pos_f | pos_t)) | (pos_f != pos_t)).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repeat")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="variants to time besides fused and two ops (leave out torch where "
                         "its grouped convolution takes seconds)")
    isa_runs.add_arguments(ap, __file__)
    args = ap.parse_args(argv)
    return isa_runs.main(args, "conv_bn_act_pool / direct_conv2d benchmark",
                         lambda: [table(args)])


def table(args: argparse.Namespace) -> isa_runs.Table:
    if not extension_loaded():
        raise SystemExit("the C++ extension is not built; the fused variant would be the "
                         "torch reference")
    import scaleinv_kernels._C as ext  # noqa: PLC0415 (only once the extension is known)

    retained = retain_freed_memory()
    print(f"- freed memory retained: {retained}, extension {ext.__file__}\n", flush=True)
    rows = []
    for key in args.cases:
        title, members = CASES[key]
        # the fused op and the two-op path always (the error column compares them)
        steps = {v: Step(v, members) for v in dict.fromkeys(["fused", "two ops",
                                                              *args.variants])}
        # against the two-op path (float64 sums); torch's grouped conv sums the weight
        # gradient over B·H·W in float32 and is itself ~1e-3 off at M=64
        ref = steps["two ops"]()
        err = float((steps["fused"]() - ref).abs().max() / ref.abs().max())
        rerouted = routed_apart(steps["two ops"])
        numel = BATCH * members * CO * HW * HW
        triad = Triad(max(1, round(numel * 4 / 2**20)))
        t = interleaved({**steps, "triad": triad}, repeats=args.repeats,
                        min_time=args.min_time)
        triad_gbps = triad.bytes / t["triad"].median / 1e9
        floor = BYTES_PER_ELEMENT * numel / (triad_gbps * 1e9)
        ms = {v: round(t[v].median * 1e3, 2) if v in t else "–" for v in VARIANTS}
        fused = t["fused"].median
        vs = {v: round(t[v].median / fused, 3) if v in t else "–" for v in VARIANTS}
        rows.append([title, ms["fused"], ms["two ops"], ms["torch"], ms["direct_conv2d"],
                     round(fused / floor, 2), vs["two ops"], vs["torch"], round(triad_gbps, 2),
                     float(f"{err:.2e}"), rerouted])
    out = {"title": "fused input layer (conv → BN → ReLU → pool) and direct_conv2d, "
                    "forward + weight gradient",
           "columns": ["case", "fused ms", "two ops ms", "torch ms", "direct_conv2d ms",
                       "fused ×floor", "vs two ops", "vs torch", "triad GB/s",
                       "rel. err grad w vs two ops", "windows routed apart"],
           "rows": rows,
           "note": f"medians of {args.repeats} interleaved repeats; direct_conv2d: the "
                   "convolution alone (forward + weight gradient, the first op of 'two ops'). "
                   "Windows routed apart: pooled windows whose gradient the two float32 "
                   "computations send to different inputs (a pre-activation within rounding "
                   "of its neighbour or of ReLU's kink). Each one moves grad w by about 1e-3 "
                   "of its largest value, so the error column is rounding only where this "
                   "count is 0; both routes are valid subgradients."}
    print(render_table(out, level=2), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
