"""Print the FusedSGDWD benchmark report (markdown) for this CPU.

    python benchmarks/report.py [bench.json] [--repeats 9] [--min-time 0.25] [--strict]

Runs the interleaved suite of ``sgd_wd_cases.py`` (the authoritative numbers: every
variant and the triad bandwidth ceiling timed round-robin in this one process, medians
of the repeats), checks the issue's targets, and, when given the JSON written by
``pytest benchmarks --benchmark-only --benchmark-json=...``, appends those sequential
pytest-benchmark medians as a cross-check. ``--strict`` exits with status 1 when a target
fails (by default the report is informational and exits 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from sgd_wd_cases import (  # benchmarks/ is on sys.path when run as a script
    CASES,
    MODES,
    VARIANTS,
    CaseResult,
    Timing,
    check_targets,
    format_case_table,
    format_targets,
    run_suite,
)

from scaleinv_kernels import FusedSGDWD


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> str:
    """Commit of the source tree, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "n/a"
    changed = sorted({ln[3:] for ln in dirty.splitlines()})
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def header(args: argparse.Namespace, load_start: str) -> list[str]:
    probe = FusedSGDWD([torch.zeros(1, requires_grad=True)], lr=0.1)
    backend = probe.backend
    warn = "" if backend == "cpp" else "  **(not the C++ kernel: numbers not representative)**"
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    return [
        "# FusedSGDWD vs torch.optim.SGD — CPU benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton_v}",
        f"- FusedSGDWD backend: {backend}{warn}; source: {git_state()}",
        "- setting: fp32, lr 0.01, momentum 0.9, weight_decay 5e-4, steps on fixed grads; "
        f"{args.repeats} interleaved repeats per entry and mode (warm: >= {args.min_time} s "
        "of back-to-back steps per repeat; cold: 1-5 steps per repeat, each after a cache "
        "flush)",
        f"- load average (1/5/15 min) before the run: {load_start}",
    ]


class OtherCpu:
    """CPU time that other processes used while this one ran (from /proc/stat minus this
    process's own usage): the sign that a run shared its cores."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields]
        busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")  # no idle/iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), busy, own.ru_utime + own.ru_stime

    def share(self) -> str:
        end = self._sample()
        if self.start is None or end is None:
            return "n/a"
        wall = end[0] - self.start[0]
        other = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return (f"{other:.1f} CPU-s in {wall:.0f} s on {os.cpu_count()} CPUs "
                f"({100 * other / (wall * (os.cpu_count() or 1)):.1f} % of the machine)")

    def fraction(self) -> float:
        end = self._sample()
        if self.start is None or end is None:
            return 0.0
        wall = end[0] - self.start[0]
        other = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return other / (wall * (os.cpu_count() or 1))


def load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def pytest_benchmark_tables(path: Path) -> str:
    """Medians per case/variant from a pytest-benchmark JSON file (sequential runs)."""
    data = json.loads(path.read_text())
    by_case: dict[str, dict[str, Timing]] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        case, variant = info.get("case"), info.get("variant")
        st = b["stats"]
        if case in CASES and variant in VARIANTS:
            by_case.setdefault(case, {})[variant] = Timing(
                variant, [], 1, (st["q1"], st["median"], st["q3"]))
    if not by_case:
        return f"(no FusedSGDWD benchmarks found in {path})"
    out = [f"## Cross-check: pytest-benchmark, sequential (`{path}`, "
           f"{data.get('datetime', '?')})", "",
           "Not interleaved; ratios only (no ceiling measured in that run). IQR column "
           "is pytest-benchmark's q1–q3.", ""]
    for key, timings in by_case.items():
        ordered = {k: timings[k] for k in VARIANTS if k in timings}
        out += [format_case_table(CaseResult(CASES[key](), ordered), ceiling_gbps=None), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="?", type=Path,
                        help="pytest-benchmark JSON to append as a cross-check")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats (>= 5)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="cold: cache flushed before each step; warm: back to back. "
                             "Targets are judged on the first mode given")
    parser.add_argument("--min-time", type=float, default=0.25,
                        help="warm mode: seconds per repeat and entry")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--triad-mib", type=int, default=256, help="MiB per triad array")
    parser.add_argument("--flush-mib", type=int, default=None,
                        help="cold mode: MiB read between steps (default 2x L3, >= 512)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if a target fails in the first mode")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 interleaved repeats)")
    if args.triad_mib < 256:
        parser.error("--triad-mib must be >= 256 (the ceiling must not fit in cache)")

    lines = header(args, load_avg())
    quiet = OtherCpu()
    time.sleep(1.0)
    if quiet.fraction() > 0.05:
        lines.append("- **warning: other processes used "
                     f"{100 * quiet.fraction():.0f} % of the CPUs just before the run**")
    others = OtherCpu()
    results = run_suite(args.cases, repeats=args.repeats, modes=args.modes,
                        min_time=args.min_time, triad_mib=args.triad_mib,
                        flush_mib=args.flush_mib,
                        log=lambda s: print(f"[report] {s}", file=sys.stderr))
    lines += [
        f"- load average after the run: {load_avg()}; other processes used "
        f"{others.share()} during the run"
        + (" — **timings with 2 threads are unreliable**" if others.fraction() > 0.05 else ""),
        f"- ceilings, {args.triad_mib} MiB per fp32 array, 12 B/element counted, timed "
        "in the same round-robins as the variants (median of all their samples): "
        + "; ".join(f"{r.mode}: triad `a = b + s*c` **{r.triad_gbps:.1f} GB/s**, in-place "
                    f"`a += s*c` {r.axpy_gbps:.1f} GB/s" for r in results),
        "",
        "Columns: median and IQR (over the interleaved repeats) of the per-step time; "
        "speed-up = baseline time / variant time (> 1: faster than torch fused + norms, "
        "resp. torch fused); GB/s counts 20 B per fp32 param (read w, g, buf; write w, buf); "
        "triad floor = 20 B/param at the triad bandwidth of the same mode (1.00 = at the "
        "floor; the triad's destination costs an uncounted write-allocate read, so in-place "
        "steps can go below 1).",
        "",
    ]
    for r in results:
        lines += [f"## {r.mode}: {MODES[r.mode]}", ""]
        for res in r.cases:
            lines += [format_case_table(res, r.triad_gbps), ""]
    by_mode = {r.mode: check_targets(r) for r in results}
    first = by_mode[results[0].mode]
    lines += ["## Targets (FusedSGDWD, track_stats=True)", "",
              f"Judged on **{results[0].mode}** (the floor is a DRAM floor); other modes "
              "for reference.", "", format_targets(by_mode), "",
              f"{sum(t.passed for t in first)}/{len(first)} targets pass ({results[0].mode}).",
              ""]
    if args.bench_json is not None:
        if args.bench_json.exists():
            lines += [pytest_benchmark_tables(args.bench_json), ""]
        else:
            lines += [f"({args.bench_json} not found: no pytest-benchmark cross-check)", ""]
    print("\n".join(lines))
    return 1 if args.strict and not all(t.passed for t in first) else 0


if __name__ == "__main__":
    sys.exit(main())
