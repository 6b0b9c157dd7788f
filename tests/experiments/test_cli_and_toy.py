"""The scaleinv CLI and the toy experiment (fig1-toy)."""

from __future__ import annotations

import pytest
import torch

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
    assert set(cli.EXPERIMENTS) == {"fig1-toy", "fig1-fullbatch", "fig2-small-lr", "fig3-swa",
                                    "fig4-equilibrium", "explr", "equilibrium-norm",
                                    "mixing-time"}


def test_cli_device_cuda(tmp_path, capsys):
    """Without CUDA the CLI refuses --device cuda:0 with exit 2 and says why; with CUDA the
    run finishes on that device and records it."""
    argv = ["fig1-toy", "--preset", "smoke", "--device", "cuda:0"]
    if not torch.cuda.is_available():
        assert cli.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert not (tmp_path / "fig1-toy").exists()  # refused before writing anything
        return
    r = run_experiment(tmp_path, *argv)
    assert r["device"] == "cuda:0" and r["preset"] == "smoke"
    assert len(r["loss_wd"]) == r["config"]["steps"]
