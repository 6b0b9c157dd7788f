"""Print the Ensemble benchmark report (markdown): one training step of M members.

    python benchmarks/ensemble_report.py [--members 8 64] [--repeats 5] [--isa avx2,default]
    python benchmarks/ensemble_report.py --model resnet20 --members 16

``--isa`` runs the whole report once per instruction set in child processes and
``--json`` names the JSON file of the tables (``isa_runs.py``; default
``benchmarks/results/ensemble_report.json``).

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
import os
import sys

import isa_runs
import torch
from bench_report import render_table
from ensemble_cases import (
    BATCH,
    BUILDERS,
    MODELS,
    VARIANTS,
    check_same_update,
    conv_flops_per_member_step,
)
from sgd_wd_cases import interleaved, paired_ratio


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
    isa_runs.add_arguments(parser, __file__)
    args = parser.parse_args(argv)
    return isa_runs.main(args, "Ensemble step benchmark", lambda: tables(args))


def tables(args: argparse.Namespace) -> list[isa_runs.Table]:
    """Times every member count of ``args``; prints and returns one table each."""
    peak = matmul_gflops()
    flops = conv_flops_per_member_step(args.model)
    shape = "×".join(str(d) for d in MODELS[args.model][1])
    drift = check_same_update(model=args.model)
    print(f"- THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} (2 MiB pages for "
          f"torch's CPU tensors)\n- fp32 matmul ceiling (2048², same run): **{peak:.0f} "
          f"GFLOP/s**; convolution work {flops / 1e6:.0f} MFLOP per member-step\n"
          f"- sanity: one step of the ensemble vs the eager loop from the same weights "
          f"differs by {drift:.1e} (max relative)\n", flush=True)
    out = []
    for m in args.members:
        steps = {k: BUILDERS[k](m, norm=args.norm, model=args.model) for k in args.variants}
        t = interleaved(steps, repeats=args.repeats, min_time=0.2, warmup=1)
        rows = []
        for k in args.variants:
            med = t[k].median
            lo, hi = t[k].iqr
            gf = flops * m / med / 1e9
            row: list[str | float | int] = [VARIANTS[k], round(1e3 * med, 1),
                                             round(1e3 * lo, 1), round(1e3 * hi, 1),
                                             round(1e3 * min(t[k].samples), 1),
                                             round(m / med, 1), round(gf, 2),
                                             round(100 * gf / peak, 1)]
            for ref in ("eager_loop", "vmap"):
                if ref in t:
                    pmed, plo, phi = paired_ratio(t[ref], t[k])
                    row += [round(t[ref].median / med, 3), round(pmed, 3), round(plo, 3),
                            round(phi, 3)]
                else:
                    row += ["–"] * 4
            row.append(round(min(t["vmap"].samples) / min(t[k].samples), 3)
                       if "vmap" in t else "–")
            rows.append(row)
        table = {
            "title": f"{args.model}, M = {m} (batch {BATCH} per member, {shape}, "
                     f"{args.norm} norm)",
            "columns": ["variant", "ms/step (median)", "IQR low ms", "IQR high ms",
                        "fastest round ms", "member-steps/s", "conv GFLOP/s",
                        "% of matmul", "eager loop / this", "per round (median)",
                        "per round (q1)", "per round (q3)", "vmap / this",
                        "per round (median)", "per round (q1)", "per round (q3)",
                        "fastest vmap / fastest this"],
            "rows": rows,
            "note": f"{args.repeats} interleaved rounds, medians; 'per round' = the ratio "
                    f"within each round (median and quartiles over rounds); fp32 matmul "
                    f"ceiling {peak:.0f} GFLOP/s in the same run; one step of the ensemble "
                    f"vs the eager loop from the same weights differs by {drift:.1e}.",
        }
        print(render_table(table, level=2), flush=True)
        out.append(table)
        del steps
    return out


if __name__ == "__main__":
    sys.exit(main())
