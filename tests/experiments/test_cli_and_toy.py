"""The scaleinv CLI and the toy experiment (fig1-toy)."""

from __future__ import annotations

import pytest

from scaleinv_kernels.experiments import cli
from tests.helpers import run_experiment


def test_fig1_toy_claim(tmp_path):
    r = run_experiment(tmp_path, "fig1-toy", "--preset", "smoke")
    steps = r["config"]["steps"]
    for key in ("loss_wd", "loss_nowd", "norm_wd", "norm_nowd"):
        assert len(r[key]) == steps
    # without WD: the norm grows and the loss converges; with WD: it never settles
    assert r["converged_nowd"] is True and r["converged_wd"] is False
    assert r["norm_nowd"][-1] > r["norm_nowd"][0]
    assert r["spikes_wd"] >= 3 and r["spikes_nowd"] == 0
    assert r["data"] is None and r["preset"] == "smoke" and r["runtime_s"] > 0


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["no-such-experiment"])
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["fig4-equilibrium", "--data", "cifar10", "--out", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert cli.main(["fig1-toy", "--device", "cuda:0", "--out", str(tmp_path)]) in (0, 2)
    assert set(cli.EXPERIMENTS) == {"fig1-toy", "fig1-fullbatch", "fig2-small-lr", "fig3-swa",
                                    "fig4-equilibrium", "explr", "equilibrium-norm"}
