"""fig3-swa: statistics on known inputs, the falsification rules both ways, smoke run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from scaleinv_kernels.experiments import fig3_swa as fig3
from scaleinv_kernels.experiments.fig3_swa import PRESETS, distance_vs_lag
from tests.experiments.test_fig2_small_lr import interrupted_then_resumed
from tests.helpers import run_experiment

NAME = "fig3-swa"


def test_distance_vs_lag():
    d = torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]])
    assert distance_vs_lag(d) == [1.5, 3.0]


def test_monotone_by_start():
    d = torch.tensor([[0.0, 1.0, 3.0, 2.0], [1.0, 0.0, 2.0, 4.0], [3.0, 2.0, 0.0, 1.0],
                      [2.0, 4.0, 1.0, 0.0]])
    # row 0: 1, 3, 2 (no); row 1: 2, 4 (yes); row 2: 1 (one lag: yes)
    assert fig3.monotone_by_start(d) == [False, True, True]
    assert fig3.strictly_increasing([1.0, 2.0, 3.0]) and not fig3.strictly_increasing([1.0, 1.0])


def test_rank_correlation():
    assert fig3.rank_correlation([0.1, 0.5, 0.7, 2.0]) == pytest.approx(1.0)
    assert fig3.rank_correlation([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    v = torch.rand(9, generator=g, dtype=torch.float64).tolist()
    # reference: Pearson correlation of the ranks, computed with numpy
    import numpy as np

    ranks = np.argsort(np.argsort(v))
    ref = np.corrcoef(ranks, np.arange(9))[0, 1]
    assert fig3.rank_correlation(v) == pytest.approx(ref, abs=1e-12)
    assert math.isnan(fig3.rank_correlation([1.0]))


def test_angle():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ref = math.acos(float((a * b).sum() / (a.norm() * b.norm())))
    assert fig3.angle(a, b) == pytest.approx(ref, rel=1e-12)
    assert fig3.angle(a, 3 * a) == pytest.approx(0.0, abs=1e-7)  # scale does not matter
    assert fig3.angle(a, -a) == pytest.approx(math.pi)
    # a tiny angle survives (acos of a cosine near 1 would round it to 0); the rotated
    # vector's exact angle is 1e-9 rad
    e1, e2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    e1[0], e2[1] = 1.0, 1.0
    tiny = math.cos(1e-9) * e1 + math.sin(1e-9) * e2
    assert fig3.angle(e1, tiny) == pytest.approx(1e-9, rel=1e-6)
    with pytest.raises(ValueError):
        fig3.angle(torch.zeros(3), a[0, :3])


def test_angle_vs_lag():
    # unit vectors rotating by 0.1 rad per step in a plane: angle = 0.1·Δ exactly
    snaps = [torch.tensor([math.cos(0.1 * t), math.sin(0.1 * t)], dtype=torch.float64)
             for t in range(5)]
    assert fig3.angle_vs_lag(snaps) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def _synthetic_result() -> dict:
    """A result with every claim holding; the tests below break one at a time."""
    return {
        "monotone": True,
        "monotone_by_start": [[True, False, True], [False, True, True]],
        "rank_correlation_by_start": [[0.9, 0.8, math.nan], [0.95, 0.7, math.nan]],
        "angle_vs_lag": {"a": [0.1, 0.3], "b": [0.2, 0.5]},
        "angle_cross_init": {"a": 1.5, "b": 1.55},
        "swa": {"0": {"swa": 0.96, "best_single": 0.95, "mean_single": 0.94},
                "5": {"swa": 0.97, "best_single": 0.955, "mean_single": 0.945}},
        "control": {"0": {"cross_init_average": 0.6, "mean_single": 0.94}},
    }


def test_claims_hold():
    c = fig3.claims(_synthetic_result())
    assert c["keeps_moving"] and c["swa_beats_best"] and c["swa_beats_mean"]
    assert c["control_no_gain"]
    assert c["monotone_fraction"] == pytest.approx(4 / 6)
    assert c["min_rank_correlation"] == pytest.approx(0.7)
    assert c["max_angle_fraction"] == pytest.approx(0.5 / 1.55)


@pytest.mark.parametrize("breaks,claim", [
    (lambda r: r.update(monotone=False), "keeps_moving"),
    (lambda r: r["rank_correlation_by_start"][1].__setitem__(0, 0.4), "keeps_moving"),
    (lambda r: r["angle_vs_lag"]["b"].append(1.45), "keeps_moving"),  # ≥ 0.9 × cross-init
    (lambda r: r["swa"]["5"].update(swa=0.955), "swa_beats_best"),
    (lambda r: r["swa"]["0"].update(swa=0.94), "swa_beats_mean"),
    (lambda r: r["control"]["0"].update(cross_init_average=0.94), "control_no_gain"),
])
def test_claims_fail(breaks, claim):
    r = copy.deepcopy(_synthetic_result())
    breaks(r)
    assert not fig3.claims(r)[claim]


def test_smoke(tmp_path, one_thread):
    r = run_experiment(tmp_path, NAME, "--preset", "smoke")
    c = PRESETS["smoke"]
    E, R, W, d0 = c["epochs"], c["runs"], c["swa_window"], c["distance_from"]
    assert r["epochs"] == list(range(E))
    assert len(r["snapshot_test_accuracy"]) == R and len(r["train_loss"]) == E
    assert all(len(a) == E and all(0.0 <= x <= 1.0 for x in a)
               for a in r["snapshot_test_accuracy"])
    single = r["snapshot_test_accuracy"]
    assert set(r["swa"]) == {str(t) for t in c["swa_start_epochs"]}
    for t, w in r["swa"].items():
        t = int(t)
        assert w["window"] == [t, t + W - 1]  # fixed length, not "to the end"
        assert w["best_single"] == pytest.approx(sum(max(a[t:t + W]) for a in single) / R)
        assert w["mean_single"] == pytest.approx(sum(sum(a[t:t + W]) / W for a in single) / R)
        assert w["swa"] == pytest.approx(sum(w["swa_per_run"]) / R)
    for t, v in r["control"].items():
        assert v["mean_single"] == pytest.approx(sum(a[int(t)] for a in single) / R)
    d = torch.tensor(r["distances"], dtype=torch.float64)
    assert d.shape == (R, E, E)
    for k in range(R):
        assert torch.equal(d[k], d[k].T) and torch.all(d[k].diagonal() == 0)
    lag = r["distance_vs_lag"]
    assert lag == pytest.approx([sum(v) / R for v in zip(*(distance_vs_lag(d[k, d0:, d0:])
                                                            for k in range(R)))])
    assert r["monotone"] == fig3.strictly_increasing(lag)
    assert r["monotone_by_start"] == [fig3.monotone_by_start(d[k, d0:, d0:]) for k in range(R)]
    # snapshots of different runs differ (different inits), so the cross-init angle is > 0
    assert set(r["angle_vs_lag"]) == set(r["angle_cross_init"]) == set(r["layers"])
    assert all(0 < v < math.pi for v in r["angle_cross_init"].values())
    assert all(len(v) == E - 1 - d0 for v in r["angle_vs_lag"].values())
    assert r["claims"] == pytest.approx(fig3.claims(r))


def test_resume_is_exact(tmp_path, one_thread, monkeypatch):
    whole, resumed = interrupted_then_resumed(tmp_path, monkeypatch, NAME)
    assert resumed == whole
