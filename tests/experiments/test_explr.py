"""explr smoke run: ExpLR without WD reproduces SGD+momentum+WD on a scale-invariant net."""

import json

import pytest

from scaleinv_kernels.experiments.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explr_smoke(tmp_path):
    assert main(["explr", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    out = tmp_path / "explr"
    r = json.loads((out / "result.json").read_text())
    assert (out / "figure.png").stat().st_size > 0
    steps = r["config"]["steps"]
    assert r["steps"] == list(range(1, steps + 1))
    assert len(r["output_rel_diff"]) == steps == len(r["predicted_ratio"])
    assert r["equivalent"] is True
    assert r["max_output_rel_diff"] == max(r["output_rel_diff"]) <= 1e-4
    c = r["config"]
    alpha = r["alpha"]
    assert alpha ** 2 - (1 + c["momentum"] - c["lr"] * c["weight_decay"]) * alpha \
        + c["momentum"] == pytest.approx(0.0, abs=1e-12)
    assert r["predicted_ratio"][-1] == pytest.approx(alpha ** -steps)
    assert set(r["weight_ratio"]) == set(r["layers"]) and len(r["layers"]) == 2
    for name, ratios in r["weight_ratio"].items():
        assert len(ratios) == steps
        for got, want in zip(ratios, r["predicted_ratio"]):
            assert got == pytest.approx(want, rel=1e-9), name
    assert r["predicted_ratio"][-1] > 1.3  # the two runs' weights really diverged in norm
