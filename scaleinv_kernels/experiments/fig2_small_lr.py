"""fig2-small-lr: a 100× smaller LR catches up once weight decay has shrunk the norm.

Claim (paper, Fig. 2). For a scale-invariant network trained with SGD, momentum μ and
weight decay λ, the initial learning rate matters far less than it seems: weight decay
shrinks ‖w‖ until the angular update per step reaches its equilibrium √(2ηλ/(1+μ))
(:func:`~scaleinv_kernels.theory.predicted_angular_update`), whatever the start. A run
with a 100× smaller η therefore only needs extra epochs for its norm to shrink; decayed
after that, it reaches the accuracy of the usual schedule. Without weight decay nothing
shrinks the norm and the small-LR run stays behind.

Theory of the wait. Under weight decay alone, heavy-ball SGD scales w by α per step, α
the larger root of x² − (1+μ−ηλ)x + μ (:func:`~scaleinv_kernels.theory.explr_alpha`,
α ≈ 1 − ηλ/(1−μ)), so ‖w‖² shrinks by α² ≈ 1 − 2ηλ/(1−μ) per step — with momentum 10×
faster than the 2ηλ one would read off plain SGD. The angular update of a
scale-invariant weight is ∝ η‖∇̃L‖/‖w‖², so a run whose angle is a factor K below the
equilibrium must shrink ‖w‖² by K: ln K / (−2 ln α) steps (:func:`norm_shrink_steps`;
the gradient's outward push and the falling ‖∇̃L‖ of a net that is learning make the
real wait longer). Here, for S (η = 1e-3, λ = 2e-2, μ = 0.9): θ* = √(2ηλ/1.9) =
4.59e-3 rad, ‖w‖² shrinks by 4.0e-4 per step, and a 45× shrink takes ln 45 / 4.0e-4 ≈
9 500 steps ≈ 300 epochs of 32 steps (not 12 500 steps). The run records the measured
shortfall K and the resulting estimate (``shrink_estimate``) next to the measured wait.

Setup (ours):

* Model: :func:`~scaleinv_kernels.experiments.training.normalized_mlp` (quick:
  784 → 128 → 128, ``Linear(bias=False)`` → ``BatchNorm1d(affine=False)`` → ReLU,
  frozen random last layer; scale-invariant in both trainable tensors), MNIST-5k
  (4000 train / 1000 test), batch 128 (32 steps per epoch, the last one of 32 images),
  μ = 0.9, λ = 2e-2 in every arm except S0.
* Three arms of ``members`` seeds each, ALL in one
  :class:`~scaleinv_kernels.ensemble.Ensemble` trained by one
  :class:`~scaleinv_kernels.ensemble.EnsembleTrainer` with per-member ``lr`` and
  ``weight_decay`` tensors (set every epoch: the arms' schedules differ in time). Seed k
  of every arm starts from the same weights; each member has its own data order.

  - ``B``: η = 0.1 for epochs 0–19, 0.01 for 20–29, 0.001 for 30–39 (``b_lrs``).
  - ``S``: η = 1e-3 (``small_factor`` = 0.01 × B's first LR), λ as B. Decay rule: at the
    end of each epoch, for every trainable layer, average the measured angular update
    (FusedSGDWD's per-step, per-member ``angular_update``) over the epoch's steps and over
    the S members; the first epoch e* at which every layer's average is ≥
    ``trigger_ratio`` = 0.9 × θ*(η, λ, μ) is the trigger. From epoch e* + 1 on η is ÷10
    for exactly ``after_decay_epochs`` = 40 epochs, then training ends. If no trigger by
    the end of epoch ``max_small_epochs`` − 1, the decay comes then (``reached`` false).
  - ``S0``: S with λ = 0 and S's LR schedule (decayed at the same epoch as S).

  Members whose schedule is over are frozen (lr = wd = 0) until the others finish.
* ``full`` (for a GPU; not run here): ``normalized_cnn`` on the chosen data set, 16
  seeds per arm, B with 100/50/50 epochs, 100 epochs after S's decay, cap 2 000 epochs.
* Accuracy: test accuracy of each member in eval mode with its BatchNorm statistics
  recomputed on all training images
  (:func:`~scaleinv_kernels.experiments.training.member_accuracies`), every
  ``eval_every`` epochs, at B's end, at S's decay and at the end.
* Verdict (:func:`verdict`), on the final accuracies (B after its 40 epochs; S and S0
  after their 40 post-decay epochs); mean over seeds, standard error s/√n each, the
  difference of two arms judged against √(SE₁² + SE₂²):

  - pass: S reached the trigger, |mean_S − mean_B| ≤ 2·SE(S−B), and S0 clearly below:
    mean_S0 < mean_S − 2·SE(S−S0) and mean_S0 < mean_B − 2·SE(B−S0);
  - fail: S reached the equilibrium angle but is more than 2 SE below B (or above it),
    or S0 is not clearly below (then the catch-up did not need weight decay);
  - inconclusive: S never reached the trigger within ``max_small_epochs``.

Measured (quick: ``python -m scaleinv_kernels.experiments fig2-small-lr --preset quick
--out out --threads 1``, seed 0; AMD EPYC with AVX2, 2 cores shared with other jobs (load
average 7–9), torch 2.13; 2 800 s wall for 640 epochs of the 24-member ensemble, ≈ 4.4 s
per epoch; one such epoch took 1.2 s on the same machine when it was nearly idle, so
≈ 13 min without the other jobs). Outcome: **inconclusive** — the decay rule never fired.

* B: during epochs 10–19 (η = 0.1) both layers' measured angular update is 0.98–1.01 ×
  θ* = 0.046 rad, so the prediction holds at B's LR. Final accuracy 95.9 % (SE 0.06).
* S: fc1 reaches 0.9 θ* at epoch 332 and stays at 0.86–1.03 θ*; fc2 does not: its norm
  stops shrinking at ≈ 0.62 from epoch ~450 on (from 4.82 at epoch 47, a 60× shrink of
  ‖w‖²), and its angular update settles at 0.49–0.56 θ* = 4.6e-3 rad. So at S's small
  LR fc2 sits at a steady norm whose angle is half the √(2ηλ/(1+μ)) prediction, and the
  decay came at the cap, epoch 600. The wait estimate (``shrink_estimate``): at epoch 47
  fc2 was 0.039 θ*, needing a 22.8× shrink of ‖w‖² = 7 800 steps ≈ 244 epochs at
  4.0e-4 per step; the measured shrink went on ≈ 400 epochs and went 60× deep, but the
  angle rose only 13× because ‖∇̃L‖ fell as the net fitted (training loss 0.46 → 0.22).
* Accuracy: S 94.7 % just before its decay, 94.6 % (SE 0.17) at the end — the decay adds
  nothing; S is 1.29 points (7 SE) below B. S0 (no weight decay; its norm stays at 6.6)
  ends at 93.8 % (SE 0.11), 0.84 points (4 SE) below S and 2.1 points below B: weight
  decay did move S up, but not to B's level within 600 epochs.

By the rules above this is neither a pass nor the stated fail (S never reached the
trigger); read plainly, a 100× smaller LR with 16× the epochs did not catch up here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.experiments.common import (
    RunContext,
    cpu_rng_state,
    figure,
    save_figure,
    set_rng_state,
)
from scaleinv_kernels.experiments.training import load_data, member_accuracies, model_factory
from scaleinv_kernels.optim import FusedSGDWD
from scaleinv_kernels.theory import explr_alpha, predicted_angular_update

NAME = "fig2-small-lr"
USES_DATA = True
ARMS = ("B", "S", "S0")
_BASE = dict(model="mlp", hidden=128, n_train=None, n_test=None, members=8, batch_size=128,
             momentum=0.9, weight_decay=2e-2, b_lrs=[0.1, 0.01, 0.001],
             b_stage_epochs=[20, 10, 10], small_factor=0.01, trigger_ratio=0.9,
             after_decay_epochs=40, max_small_epochs=600, eval_every=10, bn_images=None,
             checkpoint_every=10, chunk_size=None)
PRESETS = {
    # seconds: S cannot reach the trigger, so this runs the capped path
    "smoke": {**_BASE, "hidden": 16, "n_train": 512, "n_test": 200, "members": 2,
              "b_stage_epochs": [2, 1, 1], "after_decay_epochs": 2, "max_small_epochs": 3,
              "eval_every": 2, "checkpoint_every": 2},
    "quick": dict(_BASE),
    "full": {**_BASE, "model": "cnn", "hidden": None, "members": 16,
             "b_stage_epochs": [100, 50, 50], "after_decay_epochs": 100,
             "max_small_epochs": 2000, "eval_every": 20, "bn_images": 10000,
             "chunk_size": 16},
}


# ---- theory ---------------------------------------------------------------------------
def norm_shrink_steps(factor: float, lr: float, weight_decay: float, momentum: float) -> float:
    """Steps of SGD (LR ``lr``, momentum ``momentum``) under weight decay alone for ‖w‖²
    to shrink by ``factor`` ≥ 1: ln(factor) / (−2 ln α), α from
    :func:`~scaleinv_kernels.theory.explr_alpha` (w → α·w per step once the momentum
    buffer has settled)."""
    if not (isinstance(factor, (int, float)) and factor >= 1.0 and math.isfinite(factor)):
        raise ValueError(f"norm_shrink_steps: factor must be a finite number >= 1, got "
                         f"{factor!r}")
    if not weight_decay > 0:
        raise ValueError(f"norm_shrink_steps: weight_decay must be > 0 (nothing shrinks "
                         f"without it), got {weight_decay!r}")
    alpha = explr_alpha(lr, weight_decay, momentum)
    return math.log(factor) / (-2.0 * math.log(alpha))


# ---- schedules ------------------------------------------------------------------------
def b_epochs(c: dict) -> int:
    return sum(c["b_stage_epochs"])


def arm_hparams(c: dict, epoch: int, decay_epoch: int | None) -> dict[str, tuple[float, float]]:
    """arm → (lr, weight_decay) for ``epoch``; ``decay_epoch``: S's first decayed epoch
    (None: not yet decided). (0, 0) once an arm's schedule is over (frozen)."""
    out = {}
    stage_ends = [sum(c["b_stage_epochs"][:i + 1]) for i in range(len(c["b_stage_epochs"]))]
    stage = next((i for i, end in enumerate(stage_ends) if epoch < end), None)
    out["B"] = (0.0, 0.0) if stage is None else (c["b_lrs"][stage], c["weight_decay"])
    small = c["b_lrs"][0] * c["small_factor"]
    if decay_epoch is None or epoch < decay_epoch:
        lr = small
    elif epoch < decay_epoch + c["after_decay_epochs"]:
        lr = small / 10
    else:
        lr = 0.0
    out["S"] = (lr, c["weight_decay"] if lr else 0.0)
    out["S0"] = (lr, 0.0)
    return out


def trigger_reached(layer_angles: list[float], predicted: float, ratio: float) -> bool:
    """Every layer's measured angular update ≥ ``ratio`` × the predicted equilibrium (a NaN
    layer — no measurement — does not count as reached)."""
    if not layer_angles:
        raise ValueError("trigger_reached: no layers")
    return all(a >= ratio * predicted for a in layer_angles)  # NaN compares False


# ---- verdict --------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() < 2:
        raise ValueError(f"verdict: need >= 2 seeds per arm for a standard error, got "
                         f"{t.numel()}")
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(t.numel()))


def verdict(acc: dict[str, list[float]], reached: bool, z: float = 2.0) -> dict:
    """Pass/fail of the claim from the final per-seed accuracies of the arms B, S, S0 (see
    the module doc): mean and standard error per arm, gaps and their standard errors."""
    missing = [a for a in ARMS if a not in acc]
    if missing:
        raise ValueError(f"verdict: no accuracies for arms {missing}")
    stats = {a: _mean_se(acc[a]) for a in ARMS}
    (mb, sb), (ms, ss), (m0, s0) = stats["B"], stats["S"], stats["S0"]
    se_sb, se_s0, se_b0 = math.hypot(ss, sb), math.hypot(ss, s0), math.hypot(sb, s0)
    s_matches_b = abs(ms - mb) <= z * se_sb
    s0_behind = m0 < ms - z * se_s0 and m0 < mb - z * se_b0
    if not reached:
        outcome = "inconclusive: S never reached the equilibrium angle"
    elif not s_matches_b:
        outcome = ("fail: S reached the equilibrium angle but its accuracy stays lower"
                   if ms < mb else "fail: S reached the equilibrium angle and ends above B")
    elif not s0_behind:
        outcome = "fail: S0 (no weight decay) is not clearly below"
    else:
        outcome = "pass"
    return {"mean": {a: stats[a][0] for a in ARMS}, "se": {a: stats[a][1] for a in ARMS},
            "gap_S_minus_B": ms - mb, "se_S_minus_B": se_sb,
            "gap_S_minus_S0": ms - m0, "se_S_minus_S0": se_s0,
            "gap_B_minus_S0": mb - m0, "se_B_minus_S0": se_b0, "z": z,
            "S_matches_B": bool(s_matches_b), "S0_behind": bool(s0_behind),
            "reached": bool(reached), "outcome": outcome, "passed": outcome == "pass"}


# ---- run ------------------------------------------------------------------------------
class _EpochMean:
    """Mean over the optimizer steps of an epoch of a per-member, per-layer statistic of
    FusedSGDWD (``[M, layers]``), collected by a step post-hook."""

    def __init__(self, opt: FusedSGDWD, field: str) -> None:
        self.opt, self.field = opt, field
        self.total: torch.Tensor | None = None
        self.count = 0
        opt.register_step_post_hook(self._after_step)

    def _after_step(self, opt, args, kwargs) -> None:
        v = opt.layer_stats().per_member(self.field).double()
        self.total = v if self.total is None else self.total + v
        self.count += 1

    def take(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("_EpochMean: no optimizer step since the last take()")
        out, self.total, self.count = self.total / self.count, None, 0
        return out


def run(ctx: RunContext) -> dict:
    c = ctx.config
    m = c["members"]
    if m < 2 or c["batch_size"] < 1 or c["after_decay_epochs"] < 1 or c["max_small_epochs"] < 1:
        raise ValueError(f"{NAME}: need members >= 2 (standard errors), batch_size, "
                         f"after_decay_epochs, max_small_epochs >= 1")
    if len(c["b_lrs"]) != len(c["b_stage_epochs"]) or min(c["b_stage_epochs"]) < 1:
        raise ValueError(f"{NAME}: b_lrs and b_stage_epochs must have the same length, "
                         f"every stage >= 1 epoch")
    x, y, x_test, y_test = load_data(ctx, c["n_train"], c["n_test"])
    x_bn = x if c["bn_images"] is None else x[:c["bn_images"]]
    factory = model_factory(c["model"], x, c["hidden"])
    ens = Ensemble(factory, len(ARMS) * m, init="independent", seed=ctx.seed).to(ctx.device)
    for i in range(m, len(ARMS) * m):  # seed k of every arm: the same initial weights
        ens.load_member(i, ens.member(i % m))
    named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
    layers = [n for n, _ in named]
    opt = FusedSGDWD(named, lr=0.0, momentum=c["momentum"], weight_decay=0.0)
    trainer = EnsembleTrainer(ens, opt, (x, y), c["batch_size"], seed=ctx.seed,
                              chunk_size=c["chunk_size"], progress=False)
    steps_per_epoch = math.ceil(len(x) / c["batch_size"])
    angles = _EpochMean(opt, "angular_update")
    rows = {a: slice(k * m, (k + 1) * m) for k, a in enumerate(ARMS)}
    nb = b_epochs(c)

    curves = {"epochs": {a: [] for a in ARMS}, "lr": {a: [] for a in ARMS},
              "train_loss": {a: [] for a in ARMS},
              "angle_ratio": {a: {n: [] for n in layers} for a in ARMS},
              "weight_norm": {a: {n: [] for n in layers} for a in ARMS},
              "eval_epochs": {a: [] for a in ARMS},
              "test_accuracy": {a: [] for a in ARMS}, "test_accuracy_se": {a: [] for a in ARMS}}
    sched = {"decay_epoch": None, "trigger_epoch": None, "final": {}, "before_decay": None}
    state = ctx.restore()
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        curves, sched = state["curves"], state["sched"]
        set_rng_state(state["rng"])

    def end_epoch() -> int | None:
        d = sched["decay_epoch"]
        return None if d is None else max(nb, d + c["after_decay_epochs"])

    def evaluate(arms: list[str], done: int) -> dict[str, list[float]]:
        out = {}
        for a in arms:
            r = rows[a]
            acc = member_accuracies(ens, x_bn, x_test, y_test, range(r.start, r.stop))
            t = torch.tensor(acc, dtype=torch.float64)
            curves["eval_epochs"][a].append(done)
            curves["test_accuracy"][a].append(float(t.mean()))
            curves["test_accuracy_se"][a].append(float(t.std() / math.sqrt(len(acc))))
            out[a] = acc
        return out

    bar = ctx.progress_bar(iter(int, 1), desc=NAME, unit="epoch", initial=trainer.epoch)
    for _ in bar:
        epoch = trainer.epoch
        if end_epoch() is not None and epoch >= end_epoch():
            break
        hp = arm_hparams(c, epoch, sched["decay_epoch"])
        lr, wd = (torch.tensor([hp[a][k] for a in ARMS], dtype=torch.float64)
                  .repeat_interleave(m).to(ctx.device) for k in (0, 1))
        record = trainer.fit(1, schedule=lambda e, lr=lr, wd=wd: (lr, wd))[0]
        ang = angles.take()  # [3M, layers]
        wn = opt.layer_stats().per_member("new_weight_norm").double()
        done = epoch + 1
        active = [a for a in ARMS if hp[a][0] > 0]
        for a in active:
            r, (a_lr, a_wd) = rows[a], hp[a]
            curves["epochs"][a].append(epoch)
            curves["lr"][a].append(a_lr)
            curves["train_loss"][a].append(float(record["train_loss"][r].double().mean()))
            theta = predicted_angular_update(a_lr, a_wd, c["momentum"]) if a_wd else math.nan
            arm_ang, arm_wn = ang[r].mean(0), wn[r].mean(0)
            for j, n in enumerate(layers):
                curves["angle_ratio"][a][n].append(float(arm_ang[j]) / theta)
                curves["weight_norm"][a][n].append(float(arm_wn[j]))
        if sched["decay_epoch"] is None:
            s_lr = hp["S"][0]
            theta_s = predicted_angular_update(s_lr, c["weight_decay"], c["momentum"])
            s_ang = ang[rows["S"]].mean(0).tolist()
            if trigger_reached(s_ang, theta_s, c["trigger_ratio"]):
                sched["trigger_epoch"], sched["decay_epoch"] = epoch, done
            elif done >= c["max_small_epochs"]:
                sched["decay_epoch"] = done
        final = done == end_epoch()
        to_eval = []
        if done == nb:
            sched["final"].update({"B": evaluate(["B"], done)["B"]})
        elif "B" in active and done % c["eval_every"] == 0:
            to_eval.append("B")
        d = sched["decay_epoch"]
        if done == d:
            sched["before_decay"] = evaluate(["S", "S0"], done)
        elif d is not None and done == d + c["after_decay_epochs"]:
            sched["final"].update(evaluate(["S", "S0"], done))
        elif "S" in active and done % c["eval_every"] == 0:
            to_eval += ["S", "S0"]
        if to_eval:
            evaluate(to_eval, done)
        if done % c["checkpoint_every"] == 0 and not final:
            ctx.checkpoint({"trainer": trainer.state_dict(), "curves": curves,
                            "sched": sched, "rng": cpu_rng_state()})

    reached = sched["trigger_epoch"] is not None
    theta = {"B": [predicted_angular_update(lr_, c["weight_decay"], c["momentum"])
                   for lr_ in c["b_lrs"]],
             "S": predicted_angular_update(c["b_lrs"][0] * c["small_factor"],
                                           c["weight_decay"], c["momentum"])}
    return {**curves, "layers": layers, "steps_per_epoch": steps_per_epoch,
            "b_epochs": nb, "trigger_epoch": sched["trigger_epoch"],
            "decay_epoch": sched["decay_epoch"], "reached": reached,
            "predicted_angular_update": theta,
            "shrink_estimate": shrink_estimate(curves, c, steps_per_epoch),
            "accuracy_before_decay": sched["before_decay"],
            "final_accuracy": sched["final"],
            "verdict": verdict(sched["final"], reached)}


def shrink_estimate(curves: dict, c: dict, steps_per_epoch: int) -> dict:
    """From the epoch where S's slowest layer was furthest below the equilibrium angle
    (ratio r): the ‖w‖² shrink 0.9/r it still needed and the steps that takes under weight
    decay alone (:func:`norm_shrink_steps`) — a lower bound on the wait, to set against the
    measured trigger epoch."""
    ratios = curves["angle_ratio"]["S"]
    slowest = [min(v) for v in zip(*ratios.values())]
    decay = next((i for i, lr in enumerate(curves["lr"]["S"]) if lr < curves["lr"]["S"][0]),
                 len(slowest))
    phase = slowest[:decay]
    k = min(range(len(phase)), key=phase.__getitem__)
    factor = max(1.0, c["trigger_ratio"] / phase[k])
    steps = norm_shrink_steps(factor, c["b_lrs"][0] * c["small_factor"], c["weight_decay"],
                              c["momentum"])
    return {"from_epoch": curves["epochs"]["S"][k], "angle_ratio": phase[k],
            "norm2_shrink_needed": factor, "steps": steps,
            "epochs": steps / steps_per_epoch,
            "norm2_shrink_per_step": 1 - explr_alpha(
                c["b_lrs"][0] * c["small_factor"], c["weight_decay"], c["momentum"]) ** 2}


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(1, 3)
    colors = dict(zip(ARMS, ("C0", "C3", "C2")))
    for a in ARMS:
        ep = result["eval_epochs"][a]
        mean = [100 * v for v in result["test_accuracy"][a]]
        se = [100 * v for v in result["test_accuracy_se"][a]]
        ax[0, 0].errorbar(ep, mean, yerr=se, marker="o", ms=3, lw=1, capsize=2,
                          color=colors[a], label=a)
        for k, (layer, values) in enumerate(result["angle_ratio"][a].items()):
            if a == "S0":
                continue  # no equilibrium without weight decay
            ax[0, 1].semilogy(result["epochs"][a], values, color=colors[a], lw=1,
                              ls=("-", "--", ":")[k % 3], label=f"{a} {layer}")
        for k, (layer, values) in enumerate(result["weight_norm"][a].items()):
            ax[0, 2].semilogy(result["epochs"][a], values, color=colors[a], lw=1,
                              ls=("-", "--", ":")[k % 3], label=f"{a} {layer}")
    ax[0, 1].axhline(c["trigger_ratio"], color="k", ls="--", lw=0.8, label="trigger")
    if result["decay_epoch"] is not None:
        for a in ax[0]:
            a.axvline(result["decay_epoch"], color="grey", lw=0.8)
    ax[0, 0].set(ylabel="test accuracy [%] (mean ± SE)", title="test accuracy (BN recomputed)")
    ax[0, 1].set(ylabel="angular update / √(2ηλ/(1+μ))", title="angle vs equilibrium")
    ax[0, 2].set(ylabel="‖w_l‖ (member mean)", title="weight norm")
    for a in ax[0]:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    v = result["verdict"]
    mean = v["mean"]
    save_figure(fig, path, f"{c['members']} seeds per arm, {c['model'].upper()} on "
                           f"{result['data']}, μ={c['momentum']:g}, λ={c['weight_decay']:g}: "
                           f"B {mean['B']:.1%}, S {mean['S']:.1%}, S0 {mean['S0']:.1%} — "
                           f"{v['outcome']}")
