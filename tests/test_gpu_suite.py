"""benchmarks/gpu_suite.py --dry-run: the GPU check, run end to end on CPU tensors.

The GPU suite runs only on rarely lent machines, where a broken script costs the whole
loan; its dry run (tiny sizes, the Triton kernels in the interpreter, pytest only
collecting, an M=4 ensemble step) runs here, in a fresh python as on the GPU machine,
and must pass every section with the numbers the GPU run is judged by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
CHECKS = ("check_variants", "check_bn_act_pool", "check_gn_act_pool", "check_direct_conv2d",
          "check_conv_bn_act_pool")
SECTIONS = ("build", *CHECKS, "tests_triton", "tests_optim", "copy", "sgd_tiny",
            "time_bn_act_pool", "time_gn_act_pool", "time_conv_bn_act_pool", "ensemble")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the script must switch the interpreter on itself
    env["SCALEINV_BACKEND"] = "reference"  # and choose the backends itself
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=600,
                          check=False)
    return proc, out


def test_dry_run_passes_every_section(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["suite"]["mode"] == "dry-run" and res["suite"]["status"] == "ok"
    assert res["suite"]["exit_code"] == 0 and res["suite"]["failed_sections"] == []
    assert list(res["sections"]) == list(SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["status"] == "ok", (name, sec["summary"])
        assert sec["seconds"] >= 0 and sec["summary"]
    assert {k for k, s in res["sections"].items() if s["gate"]} == {
        "build", *CHECKS, "tests_triton", "tests_optim"}
    # the table went to the .md file and to stdout
    md = (out / "gpu_suite.md").read_text()
    for name in SECTIONS:
        assert f"| {name}" in md
    assert "| check_variants | ok |" in proc.stdout


def test_dry_run_records_the_machine_and_the_tree(dry_run) -> None:
    _, out = dry_run
    res = json.loads((out / "gpu_suite.json").read_text())
    m = res["machine"]
    for key in ("date_utc", "python", "torch", "triton", "numpy", "cuda", "gpu",
                "capability", "gpu_memory_gib", "cpu_count"):
        assert key in m, key
    assert m["device"] == "cpu" and m["triton_interpret"] == "1"
    assert res["dropped_env"] == {"SCALEINV_BACKEND": "reference"}
    pkg = res["package"]
    assert pkg["extension_loaded"]
    assert Path(pkg["scaleinv_kernels"]).resolve().is_relative_to(ROOT)
    assert Path(pkg["extension"]).resolve().is_relative_to(ROOT)


def test_dry_run_correctness_numbers_are_within_tolerance(dry_run) -> None:
    _, out = dry_run
    res = json.loads((out / "gpu_suite.json").read_text())
    sec = res["sections"]
    variants = sec["check_variants"]
    assert variants["backend"] == "triton"  # the optimizer's CUDA branch, interpreted
    assert "sgd_wd_triton" in variants["kernels_called"]
    assert set(variants["max_rel_diff"]) >= {"sgd_foreach", "sgd_fused", "fsgd_stats"}
    assert all(0 <= d <= res["tolerances"]["variants_rel"]
               for d in variants["max_rel_diff"].values()), variants
    for name, keys in (("check_bn_act_pool", {"out", "dx", "dw", "db", "rm", "rv"}),
                       ("check_gn_act_pool", {"out", "dx", "dw", "db"}),
                       ("check_direct_conv2d", {"out", "dx", "dw", "db"}),
                       ("check_conv_bn_act_pool", {"out", "dconv", "dw", "db", "rm", "rv"})):
        diff = sec[name]["max_rel_diff"]
        assert set(diff) == keys, name
        assert all(0 <= d <= res["tolerances"]["kernels_rel"] for d in diff.values()), diff


def test_dry_run_tests_and_timings(dry_run) -> None:
    _, out = dry_run
    sec = json.loads((out / "gpu_suite.json").read_text())["sections"]
    assert "-m triton tests" in sec["tests_triton"]["command"]
    assert "--collect-only" in sec["tests_triton"]["command"]
    assert sec["tests_triton"]["rc"] == 0 and "collected" in sec["tests_triton"]["summary"]
    assert sec["copy"]["gbps"] > 0
    ms = sec["sgd_tiny"]["ms"]
    assert set(ms) == {"sgd_foreach", "sgd_fused", "sgd_fused_norms", "fsgd_nostats",
                       "fsgd_stats"}
    assert all(len(q) == 3 and q[0] > 0 for q in ms.values())
    for name in ("time_bn_act_pool", "time_gn_act_pool", "time_conv_bn_act_pool"):
        assert set(sec[name]["ms"]) == {"fused", "torch"}
    ens = sec["ensemble"]
    assert ens["members"] == 4 and set(ens["ms"]) == {"ensemble", "vmap", "eager_loop"}
    assert ens["errors"] == {}


def test_sections_past_the_budget_are_skipped_with_a_reason(tmp_path) -> None:
    """With no time left every section after the (first) build section says so, and the
    suite fails."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget", "0.01",
                           "--out", str(tmp_path)], cwd=ROOT, text=True, capture_output=True,
                          timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(res["sections"]) == list(SECTIONS)
    assert all(s["status"] == "skipped" and "budget" in s["summary"]
               for name, s in res["sections"].items() if name != "build")
    assert res["suite"]["status"] == "failed" and "check_variants" in res["suite"][
        "failed_sections"]
