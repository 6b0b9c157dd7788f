"""Fused BatchNorm → ReLU → MaxPool2d(2), forward + backward, vs unfused torch.

    python benchmarks/norm_act_bench.py [--repeats 5] [--min-time 0.3] [--cases m64c16 ...]
        [--isa avx2,default] [--json PATH]

``--isa`` runs the cases once per instruction set in child processes; the tables also go
to a JSON file (``isa_runs.py``; default ``benchmarks/results/norm_act_bench.json``).

Per case (training mode, affine=False as in the scale-invariant CNN template, running
statistics updated) it times, interleaved with a triad ``a = b + s·c`` measured in the
same run (``sgd_wd_cases.Triad``/``interleaved``, medians of the repeats):

* ``fused``: ``scaleinv_kernels.ops.bn_act_pool`` forward + ``autograd.grad`` (C++ on
  CPU, Triton on CUDA);
* ``torch``: ``F.batch_norm`` → ``relu_`` → ``F.max_pool2d`` forward + backward.

The ``gn_`` cases time the GroupNorm mode instead (``scaleinv_kernels.ops.gn_act_pool``
against ``F.group_norm`` → ``relu`` → ``F.max_pool2d``), with 4 groups of 4 channels per
member, counted with the same bytes per element.

Counted minimal traffic per input element E (fp32), with pooling: forward reads x twice
(statistics, then normalize) and writes out (E/4 floats) and the index (E/4 bytes):
9.25 B; backward reads grad_out, out (E/4 floats each), the index (E/4 bytes) and x, and
writes dx: 10.25 B; 19.5 B per element in all. Without pooling: 12 B forward (x twice,
out) and 16 B backward (grad_out, out, x, dx), 28 B in all. ``GB/s`` = counted bytes /
time, ``×floor`` = time / (counted bytes / triad bandwidth); the target is ≤ 1.3. The
triad runs over arrays of x's size, so that it touches as much memory as the op: DRAM
for the M=64 cases, the 480 MB last-level cache for the chunk-of-4 cases (the calls the
ensemble benchmark makes). ``fresh outputs`` times only allocating and writing the fused
step's new tensors (dx, out, index).

Fresh output tensors cost page faults on CPU (a new 200 MB dx is ~50 000 4-KiB faults).
Like an :class:`~scaleinv_kernels.ensemble.Ensemble` (``retain_cpu_memory=True``), this
script first calls :func:`scaleinv_kernels.cpu_memory.retain_freed_memory`, so freed
blocks are reused instead of faulted in again; ``--no-retain`` leaves glibc's defaults
(both variants always get the same allocator).
"""

from __future__ import annotations

import argparse
import os
import sys

import isa_runs
import torch
import torch.nn.functional as F
from bench_report import render_table
from sgd_wd_cases import Triad, interleaved  # (benchmarks/ is on sys.path)

from scaleinv_kernels._extension import extension_loaded
from scaleinv_kernels.cpu_memory import retain_freed_memory
from scaleinv_kernels.ops.gn_act import gn_act_pool, gn_act_pool_reference
from scaleinv_kernels.ops.norm_act import bn_act_pool

CASES = {
    "m64c16": ("M=64 members x 16 ch, 28x28", (64, 64 * 16, 28, 28), 2),
    "m64c32": ("M=64 members x 32 ch, 14x14", (64, 64 * 32, 14, 14), 2),
    "m8c16": ("M=8 members x 16 ch, 28x28", (64, 8 * 16, 28, 28), 2),
    # the calls of the ensemble benchmark's chunks of 4 members (EnsembleTrainer
    # chunk_size=4): the three norm layers of the normalized CNN
    "m4c16": ("chunk of 4 x 16 ch, 28x28", (64, 4 * 16, 28, 28), 2),
    "m4c32": ("chunk of 4 x 32 ch, 14x14", (64, 4 * 32, 14, 14), 2),
    "m4c32np": ("chunk of 4 x 32 ch, 7x7, no pool", (64, 4 * 32, 7, 7), 0),
    # GroupNorm mode (scaleinv::gn_act_pool): 4 groups of 4 channels per member
    "gn_m64c16": ("GroupNorm(4), M=64 x 16 ch, 28x28", (64, 64 * 16, 28, 28), 2),
    "gn_m4c16": ("GroupNorm(4), chunk of 4 x 16 ch, 28x28", (64, 4 * 16, 28, 28), 2),
}
GROUPS_PER_MEMBER, CHANNELS_PER_MEMBER = 4, 16
BYTES_PER_ELEMENT = 9.25 + 10.25
MOMENTUM, EPS = 0.1, 1e-5


class Step:
    """One forward + backward of a variant on fixed x and grad_out (GroupNorm with
    ``groups`` groups when given, else BatchNorm in training mode)."""

    def __init__(self, fused: bool, shape: tuple[int, ...], device: torch.device,
                 pool: int = 2, groups: int | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(shape, generator=gen).to(device).requires_grad_()
        c = shape[1]
        self.rm = torch.zeros(c, device=device)
        self.rv = torch.ones(c, device=device)
        self.go = torch.randn(out_shape(shape, pool), generator=gen).to(device)
        self.fused, self.pool, self.groups = fused, pool, groups

    def __call__(self) -> None:
        if self.groups is not None:
            fn = gn_act_pool if self.fused else gn_act_pool_reference
            y = fn(self.x, None, None, self.groups, eps=EPS, relu=True, pool=self.pool)
        elif self.fused:
            y = bn_act_pool(self.x, None, None, self.rm, self.rv, training=True,
                            momentum=MOMENTUM, eps=EPS, relu=True, pool=self.pool)
        else:
            y = torch.relu_(F.batch_norm(self.x, self.rm, self.rv, None, None, True,
                                         MOMENTUM, EPS))
            y = F.max_pool2d(y, 2) if self.pool else y
        (dx,) = torch.autograd.grad(y, self.x, self.go)
        del dx


class FreshOutputs:
    """Allocates and writes the fused step's fresh outputs (dx, out, index) and nothing
    else: the page-fault/zeroing cost any eager CPU op pays for new tensors."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, pool: int = 2) -> None:
        self.shape, self.device, self.pool = shape, device, pool
        self.out_shape = out_shape(shape, pool)

    def __call__(self) -> None:
        torch.empty(self.shape, device=self.device).fill_(0)
        torch.empty(self.out_shape, device=self.device).fill_(0)
        if self.pool:
            torch.empty(self.out_shape, device=self.device, dtype=torch.uint8).fill_(0)


def out_shape(shape: tuple[int, ...], pool: int) -> tuple[int, ...]:
    return (shape[0], shape[1], shape[2] // 2, shape[3] // 2) if pool else tuple(shape)


def bytes_per_element(pool: int) -> float:
    return BYTES_PER_ELEMENT if pool else 12.0 + 16.0


def check(shape: tuple[int, ...], device: torch.device, pool: int = 2,
          groups: int | None = None) -> float:
    """Max |fused − torch| / max |torch| of the input gradient on the case's shape."""
    grads = []
    for fused in (True, False):
        s = Step(fused, shape, device, pool, groups)
        if groups is not None:
            fn = gn_act_pool if fused else gn_act_pool_reference
            y = fn(s.x, None, None, groups, eps=EPS, relu=True, pool=pool)
        elif fused:
            y = bn_act_pool(s.x, None, None, s.rm, s.rv, training=True, momentum=MOMENTUM,
                            eps=EPS, pool=pool)
        else:
            y = F.relu(F.batch_norm(s.x, s.rm, s.rv, None, None, True, MOMENTUM, EPS))
            y = F.max_pool2d(y, 2) if pool else y
        grads.append(torch.autograd.grad(y, s.x, s.go)[0])
    return float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per timed repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-retain", action="store_true",
                    help="keep glibc's malloc thresholds (fresh pages for big blocks)")
    isa_runs.add_arguments(ap, __file__)
    args = ap.parse_args(argv)
    return isa_runs.main(args, "bn_act_pool / gn_act_pool benchmark", lambda: [table(args)])


def table(args: argparse.Namespace) -> isa_runs.Table:
    retained = False if args.no_retain else retain_freed_memory()
    device = torch.device(args.device)
    if device.type == "cpu" and not extension_loaded():
        raise SystemExit("the C++ extension is not built; the fused variant would be the "
                         "torch reference")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"- device {device}, freed memory retained: {retained}, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE')}, extension {extension_path()}\n",
          flush=True)
    rows = []
    for key in args.cases:
        title, shape, pool = CASES[key]
        groups = (shape[1] // CHANNELS_PER_MEMBER * GROUPS_PER_MEMBER
                  if key.startswith("gn_") else None)
        err = check(shape, device, pool, groups)
        triad = Triad(max(1, round(torch.Size(shape).numel() * 4 / 2**20)), device)
        entries = {"fused": Step(True, shape, device, pool, groups),
                   "torch": Step(False, shape, device, pool, groups),
                   "fresh": FreshOutputs(shape, device, pool), "triad": triad}
        t = interleaved(entries, repeats=args.repeats, min_time=args.min_time, sync=sync)
        triad_gbps = triad.bytes / t["triad"].median / 1e9
        numel = torch.Size(shape).numel()
        counted = bytes_per_element(pool) * numel
        floor = counted / (triad_gbps * 1e9)
        fused, ref = t["fused"].median, t["torch"].median
        rows.append([title, str(list(shape)), round(fused * 1e3, 2), round(ref * 1e3, 2),
                     round(counted / fused / 1e9, 2), round(triad_gbps, 2),
                     round(fused / floor, 3), round(ref / fused, 3),
                     round(t["fresh"].median * 1e3, 2), float(f"{err:.2e}")])
    out = {"title": "fused norm → ReLU → pool, forward + backward",
           "columns": ["case", "shape", "fused ms", "torch ms", "fused GB/s", "triad GB/s",
                       "fused ×floor", "speed-up", "fresh outputs ms", "rel. err dx"],
           "rows": rows,
           "note": f"medians of {args.repeats} interleaved repeats; fresh outputs: allocating "
                   "+ writing dx, out and index alone (page faults), included in both "
                   "variants' times."}
    print(render_table(out, level=2), flush=True)
    return out


def extension_path() -> str:
    import scaleinv_kernels._C as ext  # noqa: PLC0415 (only once the extension is known)

    return ext.__file__


if __name__ == "__main__":
    sys.exit(main())
