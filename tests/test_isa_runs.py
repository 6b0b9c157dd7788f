"""benchmarks/isa_runs.py: the per-ISA runner's argument handling and its JSON schema."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.helpers import benchmark_module


def _isa_runs():
    return benchmark_module("isa_runs")


def test_isa_list_is_parsed_and_checked():
    ir = _isa_runs()
    assert ir.parse_isas("AVX2, default") == ["avx2", "default"]
    for bad in ("", "avx2,sse9", ","):
        with pytest.raises(SystemExit, match="--isa"):
            ir.parse_isas(bad)


def test_children_get_the_arguments_without_isa():
    ir = _isa_runs()
    argv = ["--cases", "m8", "--isa", "avx2,default", "--repeats", "3", "--isa=avx2"]
    assert ir._without_isa(argv) == ["--cases", "m8", "--repeats", "3"]


def test_default_is_always_available_and_machine_entry_is_complete():
    ir = _isa_runs()
    assert ir.available("default")
    m = ir.machine()
    assert set(m) == {"cpu", "isa", "torch", "threads", "date"}
    assert m["isa"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(m["threads"], int) and m["date"].endswith(" UTC")


def test_run_in_process_writes_the_schema(tmp_path, capsys):
    ir = _isa_runs()
    table = {"title": "t", "columns": ["case", "ms"], "rows": [["a", 1.5], ["b", 2]],
             "note": "n"}
    args = argparse.Namespace(isa=None, json=str(tmp_path / "out.json"), isa_child_json=None)
    assert ir.main(args, "demo", lambda: [table]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data) == {"title", "command", "runs"} and data["title"] == "demo"
    (run,) = data["runs"]
    assert run["tables"] == [table] and set(run["machine"]) >= {"cpu", "isa", "threads"}
    shown = benchmark_module("bench_report").render_table(table, level=2)
    assert "| a | 1.5 |" in shown and "| b | 2 |" in shown
    assert "ATen CPU capability in use" in capsys.readouterr().out


def test_unavailable_isa_is_reported_not_run(tmp_path, monkeypatch, capsys):
    ir = _isa_runs()
    monkeypatch.setattr(ir, "available", lambda isa: False)
    args = argparse.Namespace(isa="avx512", json=str(tmp_path / "out.json"),
                              isa_child_json=None)
    assert ir.main(args, "demo", lambda: pytest.fail("must not run")) == 0
    (run,) = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert run["machine"]["isa"] == "avx512" and run["machine"]["available"] is False
    assert run["tables"] == []
    assert "not available on this CPU" in capsys.readouterr().out
