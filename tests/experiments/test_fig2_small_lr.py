"""fig2-small-lr: smoke preset — schedules, curves, and the norm/effective-LR bookkeeping."""

from __future__ import annotations

import pytest

from scaleinv_kernels.experiments.fig2_small_lr import PRESETS, lr_schedule
from tests.helpers import run_experiment

NAME = "fig2-small-lr"


def test_lr_schedule():
    assert lr_schedule(1.0, 5, [2, 4]) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_schedule(0.5, 2, []) == [0.5, 0.5]


def test_smoke(tmp_path, one_thread):
    r = run_experiment(tmp_path, NAME, "--preset", "smoke")
    c = PRESETS["smoke"]
    n = {"normal": c["epochs"], "small": c["epochs"] + c["extra_epochs"]}
    assert set(r["schedules"]) == set(r["test_accuracy"]) == {"normal", "small"}
    for name, epochs in n.items():
        assert r["epochs"][name] == list(range(epochs))
        for key in ("test_accuracy", "train_loss", "weight_norm"):
            assert len(r[key][name]) == epochs
        assert r["final_test_accuracy"][name] == r["test_accuracy"][name][-1]
        assert all(0.0 <= a <= 1.0 for a in r["test_accuracy"][name])
        # per-layer effective LR η_t/‖w_l‖² and the total norm describe the same weights
        for t in range(epochs):
            inv = sum(r["schedules"][name][t] / v[t] for v in r["effective_lr"][name].values())
            assert inv == pytest.approx(r["weight_norm"][name][t] ** 2, rel=1e-6)
    # the small run: 100x smaller LR at every stage, decays shifted by the extra epochs
    small, normal = r["schedules"]["small"], r["schedules"]["normal"]
    assert small[c["extra_epochs"]:] == pytest.approx([v * c["small_factor"] for v in normal])
    assert small[:c["extra_epochs"]] == pytest.approx([c["lr"] * c["small_factor"]]
                                                      * c["extra_epochs"])
    # same init: with a 100x smaller step the norm moves far less than the normal run's
    drift = {k: abs(r["weight_norm"][k][-1] - r["weight_norm"][k][0]) for k in n}
    assert drift["small"] < drift["normal"]
    assert r["train_loss"]["normal"][-1] < r["train_loss"]["normal"][0]
