"""Write the benchmark report, ``docs/benchmarks.md``, from the benchmark JSON files.

    python benchmarks/bench_report.py [--results benchmarks/results] [--out docs/benchmarks.md]
                                      [--readme README.md]

Every benchmark script writes its tables to ``benchmarks/results/<name>.json``::

    {"title": str, "command": str,
     "runs": [{"machine": {"cpu": str, "isa": str, "torch": str, "threads": int,
                           "date": str, ["available": bool]},
               "tables": [{"title": str, "columns": [str], "rows": [[str | number]],
                           "note": str}]}]}

A run with ``"available": false`` (an instruction set the CPU lacks) has no tables.

This script validates each file (a malformed one stops it with an error naming the file
and the offending field) and renders all of them, sorted by file name, into one markdown
document: the numbers in the report are those of the JSON files, never typed by hand.
With ``--readme``, the block of that file between ``<!-- bench-table: NAME INDEX -->``
and ``<!-- bench-table: end -->`` is replaced by table INDEX of the first run of
``NAME.json``, with its machine and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "benchmarks.md"
COMMAND = "make bench-report"

MACHINE_FIELDS: dict[str, type] = {"cpu": str, "isa": str, "torch": str, "threads": int,
                                   "date": str}
README_BLOCK = re.compile(
    r"(<!-- bench-table: (?P<name>[\w.-]+) (?P<index>\d+) -->\n)(?P<body>.*?)"
    r"(<!-- bench-table: end -->)", re.S)


class ReportError(ValueError):
    """A benchmark JSON file does not follow the schema (the message names file and field)."""


# ----------------------------------------------------------------------------------
# what the benchmark scripts call
# ----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo``, else ``lscpu`` (e.g. on aarch64, whose
    cpuinfo has no model name), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The ``machine`` entry of a run, for this process."""
    import torch

    return {"cpu": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
            "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_results(path: Path, title: str, command: str, runs: Sequence[dict[str, Any]]) -> None:
    """Validate and write one results file (replacing it: results are regenerated, not
    appended to)."""
    doc = {"title": title, "command": command, "runs": list(runs)}
    validate(doc, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ReportError(f"{where}: {what}")


def _is_number(x: Any) -> bool:
    # bool is an int subclass in Python but not a number in the schema
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(doc: Any, source: str) -> None:
    """Raise :class:`ReportError` naming ``source`` and the field unless ``doc`` follows
    the schema of the module docstring."""
    _need(isinstance(doc, dict), source, f"top level must be an object, got {type(doc).__name__}")
    for key in ("title", "command"):
        _need(isinstance(doc.get(key), str) and doc[key].strip() != "", source,
              f'"{key}" must be a non-empty string')
    runs = doc.get("runs")
    _need(isinstance(runs, list) and len(runs) > 0, source, '"runs" must be a non-empty list')
    for i, run in enumerate(runs):
        where = f"{source}: runs[{i}]"
        _need(isinstance(run, dict), where, "must be an object")
        mach = run.get("machine")
        _need(isinstance(mach, dict), where, '"machine" must be an object')
        for key, kind in MACHINE_FIELDS.items():
            value = mach.get(key)
            ok = (isinstance(value, int) and not isinstance(value, bool) if kind is int
                  else isinstance(value, str))
            _need(ok, f"{where}.machine", f'"{key}" must be a {kind.__name__}, got {value!r}')
        available = mach.get("available", True)
        _need(isinstance(available, bool), f"{where}.machine", '"available" must be a bool')
        tables = run.get("tables")
        # a run of an instruction set the CPU lacks (isa_runs.py) has no tables
        _need(isinstance(tables, list) and (len(tables) > 0 or not available), where,
              '"tables" must be a non-empty list (empty only when "available" is false)')
        for j, table in enumerate(tables):
            tw = f"{where}.tables[{j}]"
            _need(isinstance(table, dict), tw, "must be an object")
            for key in ("title", "note"):
                _need(isinstance(table.get(key), str), tw, f'"{key}" must be a string')
            cols = table.get("columns")
            _need(isinstance(cols, list) and len(cols) > 0
                  and all(isinstance(c, str) for c in cols), tw,
                  '"columns" must be a non-empty list of strings')
            rows = table.get("rows")
            _need(isinstance(rows, list), tw, '"rows" must be a list')
            for k, row in enumerate(rows):
                _need(isinstance(row, list) and len(row) == len(cols), f"{tw}.rows[{k}]",
                      f"must be a list of {len(cols)} cells (one per column)")
                for cell in row:
                    _need(isinstance(cell, str) or (_is_number(cell)), f"{tw}.rows[{k}]",
                          f"cells must be strings or numbers, got {cell!r}")


def load(path: Path) -> dict[str, Any]:
    """Read and validate one results file."""
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    validate(doc, str(path))
    return doc


# ----------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------


def format_cell(cell: str | int | float) -> str:
    """Numbers with 4 significant digits (integers and large values in full), strings
    as given; ``|`` escaped so a cell cannot split the row."""
    if isinstance(cell, str):
        text = cell
    elif isinstance(cell, int) or (abs(cell) >= 1e4 and float(cell).is_integer()):
        text = f"{int(cell)}"
    elif abs(cell) >= 1e4:
        text = f"{cell:.0f}"
    else:
        text = f"{cell:.4g}"
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(table: dict[str, Any], level: int = 4) -> str:
    """One table: heading, markdown table (text columns left, numeric ones right), note."""
    cols, rows = table["columns"], table["rows"]
    numeric = [bool(rows) and all(_is_number(r[c]) for r in rows) and c > 0
               for c in range(len(cols))]
    lines = [f"{'#' * level} {table['title']}", "",
             "| " + " | ".join(format_cell(c) for c in cols) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(format_cell(c) for c in r) + " |" for r in rows]
    if table["note"].strip():
        lines += ["", table["note"].strip()]
    return "\n".join(lines)


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}; ISA {m['isa']}; torch {m['torch']}; torch threads: {m['threads']}; "
            f"{m['date']}")


def render(docs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The whole report from ``(file name, validated document)`` pairs."""
    out = ["# Benchmark report", "",
           f"Generated by `{COMMAND}` (`python benchmarks/bench_report.py`) from the JSON "
           "files in `benchmarks/results/`, which the benchmark scripts write; do not edit "
           "it by hand. Every number is one machine's measurement, named above its tables: "
           "timings on another CPU, thread count or torch version differ, and timings taken "
           "while other processes shared the CPU are noisier.", ""]
    # GitHub numbers repeated headings: the second "## T" is reached as #t-1
    seen: dict[str, int] = {}
    anchors = []
    for _, d in docs:
        base = anchor(d["title"])
        anchors.append(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    out += ["| results file | benchmark | command |", "|---|---|---|"]
    out += [f"| `{name}` | [{format_cell(d['title'])}](#{a}) | "
            f"`{format_cell(d['command'])}` |" for (name, d), a in zip(docs, anchors)]
    for name, doc in docs:
        out += ["", f"## {doc['title']}", "", f"Command: `{doc['command']}` (results file "
                f"`benchmarks/results/{name}`)."]
        many = len(doc["runs"]) > 1
        for i, run in enumerate(doc["runs"]):
            out += [""]
            if many:
                out += [f"### Run {i + 1}", ""]
            out += [f"Machine: {machine_line(run['machine'])}."]
            if not run["machine"].get("available", True):
                out += ["", f"Not run: this CPU does not support {run['machine']['isa']}."]
            for table in run["tables"]:
                out += ["", render_table(table, level=4 if many else 3)]
    return "\n".join(out) + "\n"


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def readme_block(doc: dict[str, Any], index: int, name: str) -> str:
    """Table ``index`` of ``doc``'s first run, with its machine and command."""
    tables = doc["runs"][0]["tables"]
    if not 0 <= index < len(tables):  # also a first run that was not available
        raise ReportError(f"{name}: the README asks for table {index}, the first run has "
                          f"{len(tables)}")
    return (f"**{format_cell(tables[index]['title'])}**\n\n"
            + render_table(tables[index], level=4).split("\n", 2)[2] + "\n\n"
            f"One machine's numbers: {machine_line(doc['runs'][0]['machine'])}; "
            f"command `{doc['command']}`.\n")


def update_readme(text: str, docs: dict[str, dict[str, Any]]) -> str:
    """``text`` with every ``bench-table`` block regenerated from ``docs`` (keyed by file
    stem)."""
    def repl(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in docs:
            raise ReportError(f"README block asks for {name}.json, which is not among the "
                              f"results ({', '.join(sorted(docs)) or 'none'})")
        return m.group(1) + readme_block(docs[name], int(m["index"]), name) + m.group(5)
    return README_BLOCK.sub(repl, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="folder of the benchmark JSON files")
    parser.add_argument("--out", type=Path, default=OUT, help="markdown file to write")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also regenerate this file's bench-table blocks")
    args = parser.parse_args(argv)
    files = sorted(args.results.glob("*.json"))
    if not files:
        print(f"bench_report: no *.json in {args.results}", file=sys.stderr)
        return 1
    try:
        docs = [(f.name, load(f)) for f in files]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(docs))
        if args.readme is not None:
            text = args.readme.read_text()
            new = update_readme(text, {Path(n).stem: d for n, d in docs})
            if new != text:
                args.readme.write_text(new)
    except ReportError as e:
        print(f"bench_report: {e}", file=sys.stderr)
        return 1
    print(f"bench_report: wrote {args.out} from {len(files)} file(s) in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
