"""Print the Ensemble benchmark report (markdown): one training step of M members.

    python benchmarks/ensemble_report.py [--members 8 64] [--repeats 5]
    python benchmarks/ensemble_report.py --model resnet20 --members 16

Every variant of ``ensemble_cases.py`` is timed round-robin in this one process
(medians of the interleaved repeats), next to the machine's fp32 matmul ceiling
measured in the same run; convolution FLOPs per step are counted so that the table
also says how close each variant gets to that ceiling. Speed-ups are given twice: the
ratio of the medians, and the median (IQR) over the rounds of the ratio within one round
(the 2-core benchmark VM has slow spells of seconds that hit whichever variant is
running; within a round the variants run seconds apart). The fastest round of each
variant is shown too: vmap's own step time varies most (at M=64 it page-faults in up to
~1 GB of its 3 GB working set in some steps and none in others), and its fastest rounds
are the baseline least favourable to the ensemble.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from ensemble_cases import (
    BATCH,
    BUILDERS,
    MODELS,
    VARIANTS,
    check_same_update,
    conv_flops_per_member_step,
)
from sgd_wd_cases import interleaved, paired_ratio


def _speedup(t: dict, ref: str, key: str) -> str:
    """``ref``'s median / ``key``'s median, then the median and IQR of the same ratio
    taken within each round (see ``paired_ratio``)."""
    if ref not in t:
        return "–"
    if ref == key:
        return "1.00×"
    med, lo, hi = paired_ratio(t[ref], t[key])
    return f"{t[ref].median / t[key].median:.2f}× (per round {med:.2f}×, {lo:.2f}–{hi:.2f})"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = interleaved({"mm": lambda: torch.mm(a, b)}, repeats=repeats, min_time=0.3)
    return 2.0 * n**3 / timing["mm"].median / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--variants", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--norm", choices=["batch", "group"], default="batch",
                        help="the CNN's normalization (group: GroupNorm(4), fused as "
                             "scaleinv::gn_act_pool)")
    parser.add_argument("--model", choices=list(MODELS), default="cnn",
                        help="resnet20: the CIFAR ResNet-20 (fusion found by torch.fx)")
    args = parser.parse_args(argv)
    peak = matmul_gflops()
    flops = conv_flops_per_member_step(args.model)
    shape = "×".join(str(d) for d in MODELS[args.model][1])
    lines = [
        f"# Ensemble step benchmark — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, THP_MEM_ALLOC_ENABLE="
        f"{os.environ.get('THP_MEM_ALLOC_ENABLE')} (2 MiB pages for torch's CPU tensors)",
        f"- fp32 matmul ceiling (2048², same run): **{peak:.0f} GFLOP/s**; convolution work "
        f"{flops / 1e6:.0f} MFLOP per member-step",
        f"- sanity: one step of the ensemble vs the eager loop from the same weights differs "
        f"by {check_same_update(model=args.model):.1e} (max relative)",
        "",
    ]
    for m in args.members:
        steps = {k: BUILDERS[k](m, norm=args.norm, model=args.model) for k in args.variants}
        t = interleaved(steps, repeats=args.repeats, min_time=0.2, warmup=1)
        base = {k: t[k].median for k in t}
        lines += [f"## {args.model}, M = {m} (batch {BATCH} per member, {shape}, "
                  f"{args.norm} norm)", "",
                  "| variant | ms/step (IQR) | fastest round ms | member-steps/s | "
                  "conv GFLOP/s (% of matmul) | eager loop / this | vmap / this | "
                  "fastest vmap / fastest this |", "|---|---|---|---|---|---|---|---|"]
        for k in args.variants:
            med = base[k]
            lo, hi = t[k].iqr
            gf = flops * m / med / 1e9
            vs_loop, vs_vmap = (_speedup(t, ref, k) for ref in ("eager_loop", "vmap"))
            best = min(t[k].samples)
            vs_best = (f"{min(t['vmap'].samples) / best:.2f}×" if "vmap" in t else "–")
            lines.append(f"| {VARIANTS[k]} | {1e3 * med:.1f} ({1e3 * lo:.1f}–{1e3 * hi:.1f}) | "
                         f"{1e3 * best:.1f} | {m / med:.0f} | {gf:.1f} ({100 * gf / peak:.0f} %) "
                         f"| {vs_loop} | {vs_vmap} | {vs_best} |")
        lines.append("")
        del steps
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
