"""benchmarks/conv_norm_act_bench.py: one quick run writes its table, and the error column
is explained by the rerouted-window count (rounding only where no window routes apart)."""

from __future__ import annotations

import json
import sys

import pytest

from scaleinv_kernels._extension import extension_loaded
from tests.helpers import BENCH_DIR, benchmark_module


def test_quick_run_writes_the_table(tmp_path, one_thread):
    if not extension_loaded():  # the benchmark refuses to time the torch reference
        pytest.skip("needs the C++ extension (make test and CI build it)")
    bench = benchmark_module("conv_norm_act_bench")
    out = tmp_path / "bench.json"
    argv = ["--cases", "m8", "--repeats", "1", "--min-time", "0", "--variants", "fused",
            "two ops", "--json", str(out)]
    old_argv = sys.argv
    sys.argv = [str(BENCH_DIR / "conv_norm_act_bench.py"), *argv]
    try:
        assert bench.main(argv) == 0
    finally:
        sys.argv = old_argv
    (table,) = json.loads(out.read_text())["runs"][0]["tables"]
    (row,) = table["rows"]
    cols = dict(zip(table["columns"], row))
    assert isinstance(cols["windows routed apart"], int) and cols["fused ms"] > 0
    if cols["windows routed apart"] == 0:
        # both float32 routes agree: what is left is rounding of sums over 64·28·28 terms
        assert cols["rel. err grad w vs two ops"] < 1e-5
