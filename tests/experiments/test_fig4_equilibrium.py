"""fig4-equilibrium: the smoke run's structure and statistics, the verdict logic, the
per-member BatchNorm recomputation against single models, the --init flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaleinv_kernels.ensemble import Ensemble
from scaleinv_kernels.ensemble.function_space import predict
from scaleinv_kernels.ensemble.hypothesis import holm
from scaleinv_kernels.experiments import cli
from scaleinv_kernels.experiments import fig4_equilibrium as fig4
from tests.helpers import run_experiment


def test_fig4_smoke(tmp_path):
    r = run_experiment(tmp_path, "fig4-equilibrium", "--preset", "smoke", "--threads", "1")
    c = r["config"]
    ep, tested = r["eval_epochs"], r["tested_epochs"]
    assert ep[-1] == c["epochs"] and c["equalize_epoch"] in ep
    assert tested == [e for e in ep if e >= c["equalize_epoch"]]
    assert c["init"] == "independent"
    pairs = {"const|hot", "const|cold", "hot|cold", "const|const_4x", "const|const_b"}
    assert set(r["tests"]) == pairs and set(r["noise_floor"]) == pairs
    R = c["n_permutations"]
    p_all = np.array([r["tests"][k]["p"] for k in sorted(pairs)])
    for k, t in r["tests"].items():
        assert all(len(v) == len(tested) for v in t.values())
        assert all(1 / (R + 1) - 1e-12 <= p <= 1 for p in t["p"])
        assert all(ph >= p for ph, p in zip(t["p_holm"], t["p"]))
        assert all(lo <= d <= hi for lo, d, hi in zip(t["d2_low"], t["d2"], t["d2_high"]))
        assert all(0 < f < 2 for f in r["noise_floor"][k])
        # the test's ℓ1 is the descriptive curve's, at the tested evaluations
        assert np.allclose(t["l1"], [r["l1"][k][ep.index(e)] for e in tested], rtol=1e-12)
    # one Holm family over pairs × evaluations
    holm_all = holm(p_all)
    for row, k in zip(holm_all, sorted(pairs)):
        assert np.allclose(row, r["tests"][k]["p_holm"])
    # verdicts follow from the numbers
    i_eq = tested.index(c["equalize_epoch"])
    margin = r["equivalence_margin"]
    assert margin == pytest.approx(0.02**2 * 10 / 9)
    main = ["const|hot", "const|cold", "hot|cold"]
    assert r["separated_at_equalize"] == all(r["tests"][k]["p_holm"][i_eq] < 0.05 for k in main)
    assert r["equilibrium_at_end"] == all(
        r["tests"][k]["p"][-1] >= 0.05 and r["tests"][k]["d2_high"][-1] < margin for k in main)
    assert r["positive_control_never_separated"] == (
        min(r["tests"]["const|const_b"]["p_holm"]) >= 0.05)
    assert r["claim_supported"] == (r["controls_ok"] and r["separated_at_equalize"]
                                    and r["equilibrium_at_end"])
    # the cold history is far from const at equalization, even with 6 members per schedule
    cold = r["tests"]["const|cold"]
    assert cold["p"][i_eq] <= 0.01 and cold["d2_low"][i_eq] > 0
    # λe equal after the equalization epoch for every schedule but the negative control
    after = {n: s["intrinsic_lr_after"] for n, s in r["schedules"].items()}
    assert after["const_4x"] == pytest.approx(4 * after["const"])
    assert max(v for n, v in after.items() if n != "const_4x") - min(after.values()) < 1e-12
    assert all(v[-1] > 0.6 for v in r["test_accuracy"].values())  # chance is 0.1
    for layers in r["effective_lr"].values():
        assert set(layers) == {"net.fc1.weight", "net.fc2.weight"}
        assert all(len(v) == c["epochs"] for v in layers.values())


def _tests(p, d2_high, tested=3):
    """A synthetic tests dict: p and d2_high per pair (lists over evaluations)."""
    return {k: {"p": list(p[k]), "d2": [0.0] * tested, "d2_low": [-1.0] * tested,
                "d2_high": list(d2_high.get(k, [0.0] * tested))} for k in p}


def test_verdicts_logic():
    keys = ["const|hot", "const|cold", "hot|cold", "const|const_4x", "const|const_b"]
    small, big = 1e-4, 0.9
    p = {k: [small, big, big] for k in keys[:3]}
    p["const|const_4x"] = [small, small, small]
    p["const|const_b"] = [big, big, big]
    margin = 1e-3
    v = fig4.verdicts(_tests(p, {}), [1, 2, 3, 4], 2, margin)
    assert v["tested_epochs"] == [2, 3, 4]
    assert v["separated_at_equalize"] and v["equilibrium_at_end"] and v["controls_ok"]
    assert v["claim_supported"]
    # a CI above the margin at the end: not "equal", though p is large
    v = fig4.verdicts(_tests(p, {"hot|cold": [0, 0, 2 * margin]}), [1, 2, 3, 4], 2, margin)
    assert not v["equilibrium_at_end"] and not v["equal_at_end_per_pair"]["hot|cold"]
    assert not v["claim_supported"]
    # the positive control separated once: controls fail, nothing is supported
    p2 = dict(p, **{"const|const_b": [big, small, big]})
    v = fig4.verdicts(_tests(p2, {}), [1, 2, 3, 4], 2, margin)
    assert not v["positive_control_never_separated"] and not v["claim_supported"]
    # the negative control not separated at the end
    p3 = dict(p, **{"const|const_4x": [small, small, big]})
    v = fig4.verdicts(_tests(p3, {}), [1, 2, 3, 4], 2, margin)
    assert not v["negative_control_separated_at_end"] and not v["controls_ok"]
    # Holm over 15 tests: five p of 1e-4 come first, then a raw 0.006 at rank 6 is
    # multiplied by 15 − 6 + 1 = 10 → 0.06: not separated, though 0.006 < 0.05
    p4 = dict(p, **{"const|hot": [0.006, big, big]})
    v = fig4.verdicts(_tests(p4, {}), [1, 2, 3, 4], 2, margin)
    assert not v["separated_at_equalize_per_pair"]["const|hot"]


def _toy_ensemble(m: int, seed: int) -> Ensemble:
    return Ensemble(lambda: fig4.normalized_mlp(12, 7, 5), m, init="independent", seed=seed)


def test_recalibrate_batchnorm_matches_single_models():
    """Each member's recomputed statistics equal torch's own cumulative BatchNorm average
    (momentum=None) of that member alone over the same batches."""
    torch.manual_seed(0)
    ens = _toy_ensemble(3, seed=4)
    x = torch.randn(70, 12) * 2 + 0.5  # 4 full batches of 16, 6 images dropped
    with torch.no_grad():  # make the running stats differ from the reset values
        ens.train()
        ens.forward_shared(torch.randn(16, 12))
    assert fig4.recalibrate_batchnorm_(ens, x, batch_size=16) == 4
    for i in range(3):
        model = ens.member(i)
        norms = [mod for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm1d)]
        for mod in norms:
            mod.reset_running_stats()
            mod.momentum = None
        model.train()
        with torch.no_grad():
            for b in range(4):
                model(x[b * 16:(b + 1) * 16])
        for j, ref in enumerate(norms):
            got = [mod for mod in ens.net.modules() if isinstance(mod, fig4.MemberBatchNorm)][j]
            # float32 batch statistics averaged in float64 here and in float32 by torch's
            # running update: a few ulps of the statistics' scale
            torch.testing.assert_close(got.running_mean[i], ref.running_mean, rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(got.running_var[i], ref.running_var, rtol=1e-5,
                                       atol=1e-5)
            assert got.momentum == 0.1


def test_recalibrated_predict_restores_the_ensemble():
    torch.manual_seed(1)
    ens = _toy_ensemble(4, seed=2)
    x, xt = torch.randn(64, 12), torch.randn(30, 12)
    with torch.no_grad():
        ens.train()
        ens.forward_shared(torch.randn(16, 12))
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    got = fig4.recalibrated_predict(ens, x, xt, batch_size=16)
    for k, v in ens.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ens.training
    fig4.recalibrate_batchnorm_(ens, x, batch_size=16)
    assert torch.equal(got, predict(ens, xt))
    with pytest.raises(ValueError, match="fewer than one batch"):
        fig4.recalibrate_batchnorm_(ens, x[:5], batch_size=16)


def test_cli_init_flag(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(ctx):
        seen.update(ctx.config)
        return {}

    monkeypatch.setattr(fig4, "run", fake_run)
    monkeypatch.setattr(fig4, "plot", lambda result, path: None)
    argv = ["fig4-equilibrium", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]
    assert cli.main([*argv, "--init", "shared"]) == 0
    assert seen["init"] == "shared"
    assert cli.main(argv) == 0
    assert seen["init"] == fig4.PRESETS["smoke"]["init"]
    assert cli.main(["fig1-toy", "--init", "shared", "--out", str(tmp_path)]) == 2
    assert "--init" in capsys.readouterr().err
