"""fig3-swa: smoke preset — snapshots, SWA accuracies, the distance matrix and its lags."""

from __future__ import annotations

import pytest
import torch

from scaleinv_kernels.experiments.fig3_swa import PRESETS, distance_vs_lag
from tests.helpers import run_experiment

NAME = "fig3-swa"


def test_distance_vs_lag():
    d = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    assert distance_vs_lag(d) == [1.5, 3.0]


def test_smoke(tmp_path, one_thread):
    r = run_experiment(tmp_path, NAME, "--preset", "smoke")
    c = PRESETS["smoke"]
    E = c["epochs"]
    assert r["epochs"] == list(range(E))
    assert len(r["snapshot_test_accuracy"]) == len(r["train_loss"]) == E
    assert set(r["swa_test_accuracy"]) == {str(t) for t in c["swa_start_epochs"]}
    assert all(0.0 <= a <= 1.0 for a in [*r["snapshot_test_accuracy"],
                                         *r["swa_test_accuracy"].values()])
    # SWA from the last epoch alone is that snapshot, evaluated the same way
    assert r["swa_test_accuracy"][str(E - 1)] == r["snapshot_test_accuracy"][-1]
    d = torch.tensor(r["distances"], dtype=torch.float64)
    assert d.shape == (E, E)
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0) and torch.all(d + torch.eye(E) > 0)
    lag = r["distance_vs_lag"]
    assert lag == pytest.approx(distance_vs_lag(d[c["distance_from"]:, c["distance_from"]:]))
    assert len(lag) == E - 1 - c["distance_from"]
    assert r["monotone"] == all(b > a for a, b in zip(lag, lag[1:]))
    # the claim at smoke scale: SGD keeps moving away from where it was
    assert r["monotone"]
