"""Run the FusedSGDWD benchmark, print its report (markdown) and write it as JSON.

    python benchmarks/report.py [bench.json] [--repeats 9] [--min-time 0.25] [--threads N]
                                [--strict] [--json benchmarks/results/sgd_wd_report.json]

Runs the interleaved suite of ``sgd_wd_cases.py`` (the authoritative numbers: every
variant and the triad bandwidth ceiling timed round-robin in this one process, medians
of the repeats) and checks the performance targets. Given the JSON written by
``pytest benchmarks --benchmark-only --benchmark-json=...``, it adds those sequential
pytest-benchmark medians as a cross-check. The tables go to stdout and, in the schema
of ``bench_report.py``, to ``--json`` (``make bench-report`` renders them into
``docs/benchmarks.md``). ``--strict`` exits with status 1 when a target fails (by
default the report is informational and exits 0).
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
from bench_report import machine, render_table, write_results  # benchmarks/ is on sys.path
from sgd_wd_cases import (
    BYTES_PER_PARAM,
    CASES,
    MODES,
    REF_FUSED,
    REF_NORMS,
    VARIANTS,
    CaseResult,
    Target,
    Timing,
    check_targets,
    floor_seconds,
    run_suite,
)

from scaleinv_kernels import FusedSGDWD

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "sgd_wd_report.json"


def case_table(res: CaseResult, ceiling_gbps: float | None, title: str,
               note: str = "") -> dict:
    """One case as a results table: median ms, IQR, speed-ups, GB/s and, given a ceiling
    (triad GB/s), time / floor."""
    case, tim = res.case, res.timings
    floor = floor_seconds(case, ceiling_gbps) if ceiling_gbps else None
    columns = ["variant", "median ms", "IQR ms", "× vs fused+norms", "× vs fused",
               f"GB/s @{BYTES_PER_PARAM} B/param"]
    if floor is not None:
        columns.append("time / triad floor")
    rows = []
    for key, t in tim.items():
        m = t.median
        lo, hi = t.iqr
        row = [VARIANTS.get(key, key), round(m * 1e3, 3), f"{lo * 1e3:.3f}–{hi * 1e3:.3f}",
               round(tim[REF_NORMS].median / m, 2) if REF_NORMS in tim else "n/a",
               round(tim[REF_FUSED].median / m, 2) if REF_FUSED in tim else "n/a",
               round(case.bytes_per_step / m / 1e9, 1)]
        if floor is not None:
            row.append(round(m / floor, 2))
        rows.append(row)
    desc = (f"{case.n_tensors} tensors, {case.numel / 1e6:.2f} M params, "
            f"{case.bytes_per_step / 1e6:.1f} MB moved per step"
            + (f", triad floor {floor * 1e3:.2f} ms" if floor is not None else ""))
    return {"title": f"{title}: {case.title}", "columns": columns, "rows": rows,
            "note": f"{desc}. {note}".strip()}


def targets_table(by_mode: dict[str, list[Target]], note: str) -> dict:
    modes = list(by_mode)
    columns = ["target", "bound"]
    for m in modes:
        columns += [f"{m}: measured", f"{m}: result"]
    rows = []
    for i, t in enumerate(by_mode[modes[0]]):
        row = [t.description, f"{'≥' if t.higher_is_better else '≤'} {t.bound:g}"]
        for m in modes:
            tm = by_mode[m][i]
            row += [round(tm.value, 2), "PASS" if tm.passed else "FAIL"]
        rows.append(row)
    return {"title": "Targets (FusedSGDWD, track_stats=True)", "columns": columns,
            "rows": rows, "note": note}


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
        f"- machine: {machine()['cpu']}, torch threads {torch.get_num_threads()}, "
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


def pytest_benchmark_tables(path: Path) -> list[dict]:
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
    note = ("pytest-benchmark, sequential runs, not interleaved; no ceiling measured in "
            "that run. IQR is pytest-benchmark's q1–q3.")
    out = []
    for key, timings in by_case.items():
        ordered = {k: timings[k] for k in VARIANTS if k in timings}
        out.append(case_table(CaseResult(CASES[key](), ordered), None,
                              "Cross-check (pytest-benchmark)", note))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="?", type=Path,
                        help="pytest-benchmark JSON to add as a cross-check")
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="results file for bench_report.py (default: %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if a target fails in the first mode")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 interleaved repeats)")
    if args.triad_mib < 256:
        parser.error("--triad-mib must be >= 256 (the ceiling must not fit in cache)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    command = shlex.join(["python", "benchmarks/report.py", *sys.argv[1:]])
    lines = header(args, load_avg())
    quiet = OtherCpu()
    time.sleep(1.0)
    busy_before = quiet.fraction()
    if busy_before > 0.05:
        lines.append(f"- **warning: other processes used {100 * busy_before:.0f} % of the "
                     "CPUs just before the run**")
    others = OtherCpu()
    results = run_suite(args.cases, repeats=args.repeats, modes=args.modes,
                        min_time=args.min_time, triad_mib=args.triad_mib,
                        flush_mib=args.flush_mib,
                        log=lambda s: print(f"[report] {s}", file=sys.stderr))
    busy = others.fraction()
    lines += [
        f"- load average after the run: {load_avg()}; other processes used "
        f"{others.share()} during the run"
        + (" — **timings are unreliable**" if busy > 0.05 else ""),
    ]
    setting = ("fp32, lr 0.01, momentum 0.9, weight decay 5e-4, steps on fixed gradients; "
               f"{args.repeats} interleaved repeats per entry (warm: >= {args.min_time} s of "
               "back-to-back steps per repeat; cold: 1-5 steps per repeat, each after a cache "
               "flush). Columns: median and IQR over the repeats of the per-step time; "
               "speed-up = baseline time / variant time; GB/s counts 20 B per fp32 param "
               "(read w, g, buf; write w, buf); time / triad floor: 1.00 = at the time the "
               "triad bandwidth allows for those 20 B/param."
               + (f" Other processes used {100 * busy:.0f} % of the CPUs during the run."
                  if busy > 0.05 else ""))
    tables = [{
        "title": "Bandwidth ceilings",
        "columns": ["mode", "triad a = b + s*c (GB/s)", "in-place a += s*c (GB/s)"],
        "rows": [[r.mode, round(r.triad_gbps, 1), round(r.axpy_gbps, 1)] for r in results],
        "note": f"{args.triad_mib} MiB per fp32 array, 12 B/element counted, timed in the "
                "same round-robins as the variants (median of all their samples). "
                + " ".join(f"{m}: {MODES[m]}." for m in args.modes)}]
    for r in results:
        for res in r.cases:
            tables.append(case_table(res, r.triad_gbps, f"{r.mode}", setting))
    by_mode = {r.mode: check_targets(r) for r in results}
    first = by_mode[results[0].mode]
    if first:
        tables.append(targets_table(
            by_mode, f"Judged on {results[0].mode} (the floor is a DRAM floor); "
                     f"{sum(t.passed for t in first)}/{len(first)} pass there."))
    if args.bench_json is not None:
        if args.bench_json.exists():
            tables += pytest_benchmark_tables(args.bench_json)
        else:
            lines.append(f"- ({args.bench_json} not found: no pytest-benchmark cross-check)")
    for t in tables:
        lines += ["", render_table(t, level=2)]
    print("\n".join(lines))
    write_results(args.json, "FusedSGDWD against torch.optim.SGD (CPU)", command,
                  [{"machine": machine(), "tables": tables}])
    print(f"[report] wrote {args.json}", file=sys.stderr)
    return 1 if args.strict and not all(t.passed for t in first) else 0


if __name__ == "__main__":
    sys.exit(main())
