"""equilibrium-norm smoke run: result structure, finite measurements and predictions."""

import json
import math

import pytest

from scaleinv_kernels.experiments.cli import main
from scaleinv_kernels.theory import predicted_angular_update

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equilibrium_norm_smoke(tmp_path):
    args = ["equilibrium-norm", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "equilibrium-norm"
    r = json.loads((out / "result.json").read_text())
    assert (out / "figure.png").stat().st_size > 0
    combos = r["config"]["combos"]
    assert len(r["runs"]) == len(combos) and {c["momentum"] for c in combos} == {0.0, 0.9}
    errors = []
    for run, hp in zip(r["runs"], combos):
        assert run["hparams"] == hp
        assert run["layers"] == ["conv1.weight", "conv2.weight", "conv3.weight"]
        assert run["predicted"]["angular_update"] == pytest.approx(
            predicted_angular_update(hp["lr"], hp["weight_decay"], hp["momentum"]))
        for kind in ("angular_update", "effective_lr", "unit_grad_norm"):
            values = run["measured"][kind]
            assert set(values) == set(run["layers"])
            assert all(v is not None and math.isfinite(v) and v > 0 for v in values.values())
        for kind in ("angular_update", "effective_lr"):
            errors += [abs(v) for v in run["rel_error"][kind].values()]
        assert len(run["curves"]["step"]) == r["config"]["steps"]
        assert len(run["curves"]["angular_update"]) == 3
    assert r["max_rel_error"] == pytest.approx(max(errors))
    assert r["max_rel_error"] < 1.0  # the right order of magnitude even after 40 steps
