"""fig2-small-lr: shrink/angle arithmetic, schedules, decay trigger, verdict, smoke runs."""

from __future__ import annotations

import math

import pytest
import torch

from scaleinv_kernels.experiments import fig2_small_lr as fig2
from scaleinv_kernels.theory import predicted_angular_update
from tests.helpers import run_experiment

NAME = "fig2-small-lr"


# ---- theory ---------------------------------------------------------------------------
@pytest.mark.parametrize("lr,wd,mu,factor", [(1e-2, 5e-2, 0.9, 20.0), (3e-2, 1e-2, 0.0, 7.0),
                                             (1e-3, 2e-1, 0.5, 3.3)])
def test_norm_shrink_steps_matches_sgd_under_weight_decay_alone(lr, wd, mu, factor):
    # reference: torch.optim.SGD with a zero gradient, i.e. weight decay alone
    w = torch.randn(37, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w.requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr, momentum=mu, weight_decay=wd)
    start = float(w.detach().pow(2).sum())
    steps = 0
    while float(w.detach().pow(2).sum()) > start / factor:
        w.grad = torch.zeros_like(w)
        opt.step()
        steps += 1
    predicted = fig2.norm_shrink_steps(factor, lr, wd, mu)
    # the buffer starts empty, so the first ~1/(1−μ) steps shrink less than α per step:
    # the simulation lags the asymptotic count by at most that transient (plus rounding)
    assert predicted <= steps <= predicted + 2 / (1 - mu) + 1
    # and the first-order form ln K·(1−μ)/(2ηλ) of the module doc: α's expansion in ηλ
    # has the relative correction μηλ/(1−μ)² (+ ηλ/(2(1−μ)) from −ln α ≈ 1−α), within
    # 2ηλ/(1−μ)²
    approx = math.log(factor) * (1 - mu) / (2 * lr * wd)
    assert predicted == pytest.approx(approx, rel=2 * lr * wd / (1 - mu) ** 2)


def test_norm_shrink_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="factor"):
        fig2.norm_shrink_steps(0.5, 1e-3, 1e-2, 0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        fig2.norm_shrink_steps(2.0, 1e-3, 0.0, 0.9)


def test_quick_preset_arithmetic_against_theory():
    c = fig2.PRESETS["quick"]
    small = c["b_lrs"][0] * c["small_factor"]
    theta = predicted_angular_update(small, c["weight_decay"], c["momentum"])
    assert theta == pytest.approx(math.sqrt(2 * small * c["weight_decay"] / (1 + c["momentum"])))
    # S's equilibrium angle is √100 = 10× below B's first stage (θ ∝ √η at fixed λ, μ)
    theta_b = predicted_angular_update(c["b_lrs"][0], c["weight_decay"], c["momentum"])
    assert theta_b / theta == pytest.approx(math.sqrt(1 / c["small_factor"]))
    # with momentum ‖w‖² shrinks ≈ 2ηλ/(1−μ) per step, 1/(1−μ) times the plain-SGD rate
    # (to the relative O(ηλ/(1−μ)²) of the expansion, see the test above)
    lam, mu = c["weight_decay"], c["momentum"]
    per_step = 1 / fig2.norm_shrink_steps(math.e, small, lam, mu)
    assert per_step == pytest.approx(2 * small * lam / (1 - mu),
                                     rel=2 * small * lam / (1 - mu) ** 2)


# ---- schedules and trigger --------------------------------------------------------------
def test_arm_hparams():
    c = {**fig2.PRESETS["quick"], "b_lrs": [1.0, 0.5], "b_stage_epochs": [2, 1],
         "small_factor": 0.01, "after_decay_epochs": 2, "weight_decay": 0.3}
    b = [fig2.arm_hparams(c, e, None)["B"] for e in range(4)]
    assert b == [(1.0, 0.3), (1.0, 0.3), (0.5, 0.3), (0.0, 0.0)]
    for e in range(6):  # undecided: S stays at the small LR, S0 without weight decay
        hp = fig2.arm_hparams(c, e, None)
        assert hp["S"] == pytest.approx((0.01, 0.3)) and hp["S0"] == pytest.approx((0.01, 0.0))
    s = [fig2.arm_hparams(c, e, 4)["S"][0] for e in range(8)]
    assert s == pytest.approx([0.01] * 4 + [0.001] * 2 + [0.0] * 2)
    assert fig2.arm_hparams(c, 6, 4)["S"] == (0.0, 0.0)  # frozen after its schedule


def test_trigger_reached():
    assert fig2.trigger_reached([0.9, 1.3], 1.0, 0.9)
    assert not fig2.trigger_reached([0.95, 0.89], 1.0, 0.9)  # every layer must be there
    assert not fig2.trigger_reached([math.nan, 2.0], 1.0, 0.9)
    with pytest.raises(ValueError):
        fig2.trigger_reached([], 1.0, 0.9)


# ---- verdict ----------------------------------------------------------------------------
def _arm(mean: float, spread: float, n: int = 8) -> list[float]:
    g = torch.Generator().manual_seed(int(mean * 1000))
    return (mean + spread * torch.randn(n, generator=g, dtype=torch.float64)).tolist()


def test_verdict_statistics():
    acc = {"B": [0.9, 0.92, 0.91], "S": [0.89, 0.93, 0.9], "S0": [0.8, 0.82, 0.81]}
    v = fig2.verdict(acc, reached=True)
    for a, values in acc.items():
        t = torch.tensor(values, dtype=torch.float64)
        assert v["mean"][a] == pytest.approx(float(t.mean()))
        assert v["se"][a] == pytest.approx(float(t.std()) / math.sqrt(3))
    assert v["se_S_minus_B"] == pytest.approx(math.hypot(v["se"]["S"], v["se"]["B"]))
    assert v["gap_S_minus_B"] == pytest.approx(v["mean"]["S"] - v["mean"]["B"])


def test_verdict_pass_and_fail():
    b, s0 = _arm(0.95, 0.004), _arm(0.90, 0.004)
    assert fig2.verdict({"B": b, "S": _arm(0.951, 0.004), "S0": s0}, True)["outcome"] == "pass"
    lower = fig2.verdict({"B": b, "S": _arm(0.93, 0.004), "S0": s0}, True)
    assert lower["outcome"].startswith("fail: S reached the equilibrium angle but")
    assert not lower["passed"] and not lower["S_matches_B"]
    above = fig2.verdict({"B": b, "S": _arm(0.97, 0.004), "S0": s0}, True)
    assert above["outcome"].startswith("fail") and "above" in above["outcome"]
    caught_up = fig2.verdict({"B": b, "S": _arm(0.951, 0.004), "S0": _arm(0.949, 0.004)}, True)
    assert caught_up["outcome"].startswith("fail: S0") and not caught_up["S0_behind"]
    never = fig2.verdict({"B": b, "S": _arm(0.951, 0.004), "S0": s0}, False)
    assert never["outcome"].startswith("inconclusive") and not never["passed"]


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="arms"):
        fig2.verdict({"B": [0.9, 0.9], "S": [0.9, 0.9]}, True)
    with pytest.raises(ValueError, match="seeds"):
        fig2.verdict({"B": [0.9], "S": [0.9, 0.8], "S0": [0.7, 0.7]}, True)


# ---- smoke runs -------------------------------------------------------------------------
def _check_run(r: dict, c: dict) -> None:
    layers = r["layers"]
    assert len(layers) == 2  # the MLP's two trainable weights
    d = r["decay_epoch"]
    assert d is not None
    n_s = d + c["after_decay_epochs"]
    assert r["epochs"]["B"] == list(range(fig2.b_epochs(c)))
    assert r["epochs"]["S"] == r["epochs"]["S0"] == list(range(n_s))
    assert r["lr"]["S"] == r["lr"]["S0"] == pytest.approx(
        [fig2.arm_hparams(c, e, d)["S"][0] for e in range(n_s)])
    # the trigger: the first epoch at which every layer of S was at the threshold
    slowest = [min(v) for v in zip(*(r["angle_ratio"]["S"][n] for n in layers))]
    reached = [e for e in range(d) if slowest[e] >= c["trigger_ratio"]]
    if r["reached"]:
        assert reached == [d - 1] and r["trigger_epoch"] == d - 1
    else:
        assert reached == [] and d == c["max_small_epochs"] and r["trigger_epoch"] is None
    # no equilibrium angle without weight decay: NaN, written as null
    assert all(r["angle_ratio"]["S0"][n] == [None] * n_s for n in layers)
    for a, n in (("B", fig2.b_epochs(c)), ("S", n_s), ("S0", n_s)):
        assert len(r["final_accuracy"][a]) == c["members"]
        assert r["eval_epochs"][a][-1] == n
        assert r["test_accuracy"][a][-1] == pytest.approx(
            sum(r["final_accuracy"][a]) / c["members"])
    expected = fig2.verdict(r["final_accuracy"], r["reached"])
    assert r["verdict"]["outcome"] == expected["outcome"]
    for key in ("mean", "se"):
        assert r["verdict"][key] == pytest.approx(expected[key])
    theta = predicted_angular_update(c["b_lrs"][0] * c["small_factor"], c["weight_decay"],
                                     c["momentum"])
    assert r["predicted_angular_update"]["S"] == pytest.approx(theta)


def test_smoke_capped(tmp_path, one_thread):
    r = run_experiment(tmp_path, NAME, "--preset", "smoke")
    _check_run(r, fig2.PRESETS["smoke"])
    assert not r["reached"] and r["verdict"]["outcome"].startswith("inconclusive")
    est = r["shrink_estimate"]
    assert est["norm2_shrink_needed"] >= 1 and est["steps"] > 0


def test_smoke_triggered(tmp_path, one_thread, monkeypatch):
    # a threshold S passes at once exercises the trigger path (S's angle starts at a
    # sizeable fraction of θ* while the gradients are large)
    c = {**fig2.PRESETS["smoke"], "trigger_ratio": 0.02}
    monkeypatch.setitem(fig2.PRESETS, "smoke", c)
    r = run_experiment(tmp_path, NAME, "--preset", "smoke")
    assert r["reached"]
    _check_run(r, c)


def interrupted_then_resumed(tmp_path, monkeypatch, name: str) -> tuple[dict, dict]:
    """(uninterrupted result, result of a run stopped right after its first checkpoint
    and continued with --resume), both of the smoke preset, without runtimes."""
    from scaleinv_kernels.experiments import cli, common

    class Stop(Exception):
        pass

    whole = run_experiment(tmp_path / "whole", name, "--preset", "smoke")
    write = common.RunContext.checkpoint

    def write_then_stop(self, state):
        write(self, state)
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(common.RunContext, "checkpoint", write_then_stop)
        with pytest.raises(Stop):
            cli.main([name, "--preset", "smoke", "--out", str(tmp_path / "cut"),
                      "--no-progress"])
    resumed = run_experiment(tmp_path / "cut", name, "--preset", "smoke", "--resume")
    for r in (whole, resumed):
        r.pop("runtime_s")
    return whole, resumed


def test_resume_is_exact(tmp_path, one_thread, monkeypatch):
    whole, resumed = interrupted_then_resumed(tmp_path, monkeypatch, NAME)
    assert resumed == whole
