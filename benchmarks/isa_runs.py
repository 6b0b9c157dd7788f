"""Run a benchmark script once per CPU instruction set and collect its tables as JSON.

``--isa avx512,avx2,default`` makes the script start itself once per instruction set, in a
child process with ``ATEN_CPU_CAPABILITY`` (the build of ATen's and this package's CPU
kernels) and ``ONEDNN_MAX_CPU_ISA`` (oneDNN's convolutions and matmuls) set to it; an
instruction set this CPU lacks is reported as not available, not run. Each run prints a
header (CPU model, the ATen capability actually in use, torch version, threads, UTC date,
command) and its tables; all runs go into one JSON file::

    {"title": str, "command": str,
     "runs": [{"machine": {"cpu": str, "isa": str, "torch": str, "threads": int,
                           "date": str},
               "tables": [{"title": str, "columns": [str], "rows": [[str | float | int]],
                           "note": str}]}]}

A run of an instruction set the CPU lacks has ``"isa"`` set to the requested one,
``"available": false`` in its machine entry and no tables. Without ``--isa`` the script
runs in its own process (whatever the environment selects) and writes one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_report import cpu_model, machine, write_results  # benchmarks/ is on sys.path

#: --isa name -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA). oneDNN's lowest x86 level is
#: SSE41: "default" keeps oneDNN's vector kernels at the baseline of the portable build.
ISA_ENV = {
    "avx512": ("avx512", "AVX512_CORE"),
    "avx2": ("avx2", "AVX2"),
    "default": ("default", "SSE41"),
}
RESULTS = Path(__file__).resolve().parent / "results"
_CHILD_JSON = "--isa-child-json"
_COMMAND_ENV = "SCALEINV_BENCH_COMMAND"

Table = dict[str, Any]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available(isa: str) -> bool:
    """Whether this CPU can run ATen's ``isa`` build (ATen's own requirements: AVX2 needs
    avx2 + fma; AVX-512 needs avx512 f/bw/vl/dq)."""
    if isa == "default":
        return True
    flags = cpu_flags()
    if isa == "avx2":
        return {"avx2", "fma"} <= flags
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags


def command() -> str:
    """The command as typed (a child run reports its parent's)."""
    return os.environ.get(_COMMAND_ENV) or shlex.join(["python", *sys.argv])


def header(title: str) -> str:
    m = machine()
    return (f"# {title}\n\n- CPU: {m['cpu']}; ATen CPU capability in use: {m['isa']}; "
            f"torch {m['torch']}; {m['threads']} threads; {m['date']}\n"
            f"- command: `{command()}`\n")


def add_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    parser.add_argument("--isa", default=None,
                        help="comma list of instruction sets to run, each in a child process "
                             "(avx512, avx2, default)")
    parser.add_argument("--json", default=str(RESULTS / f"{Path(script).stem}.json"),
                        help="where to write the tables (default: benchmarks/results/"
                             "<script>.json)")
    parser.add_argument(_CHILD_JSON, default=None, help=argparse.SUPPRESS)


def parse_isas(text: str) -> list[str]:
    isas = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in isas if s not in ISA_ENV]
    if not isas or bad:
        raise SystemExit(f"--isa: expected a comma list of {', '.join(ISA_ENV)}, got {text!r}")
    return isas


def main(args: argparse.Namespace, title: str, body: Callable[[], list[Table]]) -> int:
    """Runs ``body`` (which prints its own tables and returns them) here, or once per
    ``--isa`` entry in child processes; writes the JSON file."""
    child_json = getattr(args, _CHILD_JSON.lstrip("-").replace("-", "_"))
    if child_json is not None or args.isa is None:
        print(header(title), flush=True)
        run = {"machine": machine(), "tables": body()}
        if child_json is not None:
            Path(child_json).write_text(json.dumps(run))
            return 0
        return _write(args.json, title, [run])
    runs = []
    for isa in parse_isas(args.isa):
        if not available(isa):
            print(f"# {title}\n\n- {isa}: not available on this CPU ({cpu_model()})\n",
                  flush=True)
            runs.append({"machine": {**machine(), "isa": isa, "available": False},
                         "tables": []})
            continue
        aten, onednn = ISA_ENV[isa]
        env = {**os.environ, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn,
               _COMMAND_ENV: command()}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            argv = _without_isa(sys.argv[1:])
            rc = subprocess.run([sys.executable, sys.argv[0], *argv, _CHILD_JSON, str(out)],
                                env=env).returncode
            if rc != 0:
                raise SystemExit(f"the {isa} run failed (exit status {rc})")
            runs.append(json.loads(out.read_text()))
        used = runs[-1]["machine"]["isa"]
        if used.lower() != aten:
            raise SystemExit(f"asked for {aten}, but ATen ran {used}")
    return _write(args.json, title, runs)


def _without_isa(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--isa":
            skip = True
        elif not a.startswith("--isa="):
            out.append(a)
    return out


def _write(path: str, title: str, runs: list[dict[str, Any]]) -> int:
    write_results(Path(path), title, command(), runs)  # validated against the schema
    print(f"(tables written to {path})")
    return 0
