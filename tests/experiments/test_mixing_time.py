"""mixing-time: smoke run, the sequential mixing rule, the summary/verdict, and step-wise
training against EnsembleTrainer's epochs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.hypothesis import holm
from scaleinv_kernels.experiments import mixing_time as mix
from scaleinv_kernels.experiments.training import normalized_mlp
from scaleinv_kernels.optim import FusedSGDWD
from tests.helpers import assert_bitwise, run_experiment

SMOKE = ("mixing-time", "--preset", "smoke", "--threads", "1")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_experiment(tmp_path_factory.mktemp("mixing"), *SMOKE)


def test_mixing_time_smoke(smoke):
    r = smoke
    c = r["config"]
    assert set(r["lambdas"]) == {f"{lam:g}" for lam in c["lambdas"]}
    for rec in r["lambdas"].values():
        lam = rec["lambda_e"]
        assert rec["steps"] == [round(g / lam) for g in c["grid"]]
        assert rec["lr"] * rec["wd"] == pytest.approx(lam)
        assert np.allclose(rec["p_holm"], holm(rec["p"]))
        R = c["n_permutations"]
        assert all(1 / (R + 1) - 1e-12 <= p <= 1 for p in rec["p"])
        assert all(lo <= d <= hi for lo, d, hi in zip(rec["d2_low"], rec["d2"], rec["d2_high"]))
        # step 0: the hot and cold pasts are far apart (6 + 6 members suffice)
        assert rec["p"][0] <= 0.01 and rec["d2_low"][0] > 0
        # the mixing rule, re-derived: first evaluation after which no Holm p < 0.05
        sep = [i for i, p in enumerate(rec["p_holm"]) if p < 0.05]
        first = (sep[-1] + 1) if sep else 0
        if first < len(c["grid"]):
            assert rec["mixed"] and rec["steps_times_lambda"] == c["grid"][first]
            assert rec["mixing_steps"] == rec["steps"][first]
        else:
            assert not rec["mixed"]
        # the pre-phase is the same for every λe: same nets at step 0
        assert rec["test_accuracy"]["hot"][0] == r["lambdas"][f"{c['lambdas'][0]:g}"][
            "test_accuracy"]["hot"][0]
    assert not (r["claim_falsified"] and r["claim_supported"])


@pytest.mark.parametrize("crash", ["second_lambda_second_eval", "second_lambda_first_eval",
                                   "first_lambda_last_eval"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, smoke,
                                                          crash):
    """A run that dies mid-λe, right after a λe finished, or in a λe's last evaluation
    leaves a checkpoint; --resume continues from it and ends with exactly the uninterrupted
    run's result."""
    from scaleinv_kernels.experiments import cli

    evals = len(smoke["config"]["grid"])
    dies_at = {"second_lambda_second_eval": evals + 2, "second_lambda_first_eval": evals + 1,
               "first_lambda_last_eval": evals}[crash]
    real, calls = mix.permutation_test, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == dies_at:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(mix, "permutation_test", dies)
    argv = [*SMOKE, "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(RuntimeError, match="killed"):
        cli.main(argv)
    ckpt = tmp_path / "mixing-time" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)["state"]
    first = f"{smoke['config']['lambdas'][0]:g}"
    if crash == "first_lambda_last_eval":
        assert list(state["per_lambda"]) == [] and state["current"]["i"] == evals - 1
    else:
        assert list(state["per_lambda"]) == [first]
        where = None if state["current"] is None else (state["current"]["j"],
                                                       state["current"]["i"])
        assert where == {"second_lambda_second_eval": (1, 1),
                         "second_lambda_first_eval": None}[crash]
    monkeypatch.setattr(mix, "permutation_test", real)
    assert cli.main([*argv, "--resume"]) == 0
    assert not ckpt.exists()
    resumed = json.loads((tmp_path / "mixing-time" / "result.json").read_text())
    expected = dict(smoke)
    for r in (resumed, expected):
        r.pop("runtime_s")
    assert resumed == expected  # every p-value, D² and accuracy exactly equal


def test_mixing_index():
    assert mix.mixing_index([0.01, 0.5, 0.9]) == 1
    assert mix.mixing_index([0.01, 0.5, 0.01, 0.2, 1.0]) == 3  # separated again at 2
    assert mix.mixing_index([0.01, 0.02]) is None
    assert mix.mixing_index([0.3, 0.5]) == 0
    assert mix.mixing_index([0.05, 0.049], alpha=0.05) is None


def _rec(lam, p_holm, grid):
    return {"lambda_e": lam, "p_holm": p_holm, "steps": [round(g / lam) for g in grid]}


def test_summarize_verdicts():
    grid = [0.0, 0.25, 0.5, 1.0, 2.0]
    sep, ok = 0.001, 0.9
    # flat: every λe mixes at λe·t = 0.5
    flat = {f"{lam:g}": _rec(lam, [sep, sep, ok, ok, ok], grid) for lam in (1e-3, 8e-3)}
    s = mix.summarize(flat, grid)
    assert s["ratio_max_over_min"] == 1.0 and s["claim_supported"] and not s["claim_falsified"]
    assert s["slope_log_tmix_vs_log_lambda"] == pytest.approx(-1.0)
    assert s["per_lambda"]["0.001"]["bracket"] == [0.25, 0.5]
    assert s["per_lambda"]["0.008"]["mixing_steps"] == round(0.5 / 8e-3)
    # a fixed number of steps: λe·t grows 8× from 0.25 to 2
    steps = {"0.001": _rec(1e-3, [sep, ok, ok, ok, ok], grid),
             "0.008": _rec(8e-3, [sep, sep, sep, sep, ok], grid)}
    s = mix.summarize(steps, grid)
    assert s["ratio_max_over_min"] == pytest.approx(8.0) and s["claim_falsified"]
    assert s["slope_log_tmix_vs_log_lambda"] == pytest.approx(0.0, abs=1e-12)
    # not mixed within the horizon: counts at the horizon (a lower bound)
    late = {"0.001": _rec(1e-3, [sep, sep, ok, ok, ok], grid),
            "0.008": _rec(8e-3, [sep] * 5, grid)}
    s = mix.summarize(late, grid)
    assert not s["all_mixed"] and s["ratio_max_over_min"] == pytest.approx(4.0)
    assert s["claim_falsified"] and not s["claim_supported"]
    assert s["per_lambda"]["0.008"]["bracket"] == [2.0, None]
    # not separated at step 0: no resolution, no verdict
    s = mix.summarize({"0.001": _rec(1e-3, [ok] * 5, grid)}, grid)
    assert s["ratio_max_over_min"] is None
    assert not s["claim_falsified"] and not s["claim_supported"]
    assert math.isclose(s["falsify_factor"], 8 ** 0.5)


def _trainer(seed: int):
    X = torch.randn(96, 12, generator=torch.Generator().manual_seed(seed))
    Y = torch.randint(0, 5, (96,), generator=torch.Generator().manual_seed(seed + 1))
    ens = Ensemble(lambda: normalized_mlp(12, 8, 5), 3, init="independent", seed=seed)
    named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=0.1, momentum=0.0, weight_decay=0.01)
    return ens, EnsembleTrainer(ens, opt, (X, Y), 16, seed=seed, progress=False)


def test_step_trainer_matches_epochs():
    """Stepping through whole epochs (96 = 6 batches of 16) is EnsembleTrainer's
    train_epoch, bit for bit: same data order, same forward/backward, same updates."""
    ens_a, tr_a = _trainer(3)
    ens_b, tr_b = _trainer(3)
    tr_a.fit(2)
    stepper = mix.StepTrainer(tr_b)
    stepper.step(5)
    stepper.step(7)  # across the epoch boundary
    assert stepper.steps == 12 and stepper.epoch == 1
    for (name, a), b in zip(ens_a.state_dict().items(), ens_b.state_dict().values()):
        assert_bitwise(b, a, name)
