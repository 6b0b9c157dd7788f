"""mixing-time: SGD + WD forgets its past after O(1/λe) steps, at every intrinsic LR λe.

Claim. Two ensembles of scale-invariant nets with different histories that run at the
same intrinsic LR λe = η·λ from step 0 on become indistinguishable in function space
after a number of steps proportional to 1/λe: the mixing time t_mix satisfies
t_mix·λe ≈ const, independent of λe.

Measurement, per λe ∈ {1, 2, 4, 8}·10⁻³ (quick):

* pre-phase (the "past"), the same for every λe: ``hot`` members run at (η, λ) =
  (0.8, 0.04), λe = 3.2e-2, ``cold`` members at (0.003, 0.01), λe = 3e-5, for
  ``pre_steps`` steps (each member its own initialization and data order). Every λe's
  run repeats this phase bit for bit (same seeds, same member indices), so all λe start
  from the same two ensembles;
* measured phase: both ensembles at (η, λ) = (λe/0.04, 0.04) — the same λe and the same
  split between η and λ, so only the history differs — for ``horizon``/λe steps;
* at steps t with λe·t on the grid ``grid`` (the same grid in units of 1/λe for every
  λe): BatchNorm statistics recomputed on training data per member
  (:func:`~scaleinv_kernels.experiments.fig4_equilibrium.recalibrated_predict`), labels
  on the test set, the permutation test hot vs cold (ℓ1 statistic, R re-splits) and the
  debiased D² with its bootstrap CI (:mod:`scaleinv_kernels.ensemble.hypothesis`);
* the p-values of one λe (one family: its evaluations) are Holm-corrected; the
  **mixing time** t_mix is the first evaluation from which on every Holm p ≥ 0.05 (a
  sequential rule: separated before, never separated again up to the horizon). Its
  resolution is the grid: t_mix·λe lies in (previous grid point, this grid point];
  "not mixed" if the last evaluation is still separated.

**Falsified if** t_mix·λe varies by more than a factor √8 ≈ 2.83 across the 8× range of
λe (max/min of the grid values). √8 is the geometric midpoint between the claim (factor
1: t_mix ∝ 1/λe) and its alternative "mixing takes a fixed number of steps" (factor 8:
t_mix·λe ∝ λe). Resolution: consecutive grid points differ by factors 1.33–2, so a
ratio up to 2 is within one grid step of flat. A λe that does not mix within the horizon
counts as t_mix·λe > horizon. Also reported: the least-squares slope of
log t_mix against log λe (−1 under the claim, 0 for a fixed number of steps).

Caveat: "no longer separated" depends on the test's power, i.e. on the ensemble size M
and the test set: a larger M detects smaller remaining differences and gives a later
t_mix. The comparison across λe is fair because M, the data and the test are the same
for every λe; the absolute value of t_mix·λe is not a property of SGD alone.

Setup (quick, 2-core CPU): MNIST-5k, the first 2048 training images (64 steps per
epoch), batch 32, the BatchNorm MLP of fig4-equilibrium with 64 hidden units, plain SGD,
24 members per history (48 nets per λe, each its own initialization: ``init``
"independent"), pre-phase 125 steps, horizon 2/λe steps (2000 steps at λe = 1e-3),
grid λe·t ∈ {0, 1/8, 1/4, 3/8, 1/2, 3/4, 1, 3/2, 2}, R = 1000 re-splits, B = 500 bootstrap
replicates, BatchNorm statistics from 1024 training images.

Resumable (``--resume``): a checkpoint after every evaluation holds the finished λe's
records and, for the λe in progress, the members, the optimizer, the position in the data
order and the record so far; a resumed run's result equals an uninterrupted one's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scaleinv_kernels.data import load_dataset
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.hypothesis import (
    d2_bootstrap,
    equivalence_margin,
    holm,
    permutation_test,
)
from scaleinv_kernels.experiments.common import RunContext, figure, save_figure
from scaleinv_kernels.experiments.fig4_equilibrium import recalibrated_predict
from scaleinv_kernels.experiments.training import normalized_mlp
from scaleinv_kernels.optim import FusedSGDWD

NAME = "mixing-time"
USES_DATA = True
ALPHA = 0.05
FALSIFY_FACTOR = math.sqrt(8.0)

_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0)
_HISTORIES = {"hot": (0.8, 0.04), "cold": (0.003, 0.01)}
PRESETS = {
    "smoke": dict(lambdas=(4e-3, 8e-3), wd=0.04, histories=_HISTORIES, pre_steps=40,
                  grid=(0.0, 0.25, 0.5, 1.0), members=6, hidden=16, batch_size=32,
                  train_subset=512, bn_points=256, init="independent",
                  n_permutations=300, n_bootstrap=100, accuracy_gap=0.02),
    "quick": dict(lambdas=(1e-3, 2e-3, 4e-3, 8e-3), wd=0.04, histories=_HISTORIES,
                  pre_steps=125, grid=_GRID, members=24, hidden=64, batch_size=32,
                  train_subset=2048, bn_points=1024, init="independent",
                  n_permutations=1000, n_bootstrap=500, accuracy_gap=0.02),
    "full": dict(lambdas=(1e-3, 2e-3, 4e-3, 8e-3), wd=0.04, histories=_HISTORIES,
                 pre_steps=250, grid=_GRID + (3.0, 4.0), members=128, hidden=128,
                 batch_size=128, train_subset=None, bn_points=None, init="independent",
                 n_permutations=2000, n_bootstrap=1000, accuracy_gap=0.02),
}


class StepTrainer:
    """Step-granular training on top of :class:`EnsembleTrainer`'s per-member data order:
    member i visits the data in the order ``trainer.permutations(epoch)``, one batch of
    ``batch_size`` per step, across epoch boundaries (the last partial batch of an epoch
    is skipped, so every step has the same batch size)."""

    def __init__(self, trainer: EnsembleTrainer) -> None:
        self.trainer = trainer
        self.epoch, self.pos = 0, 0
        self.perm = trainer.permutations(0)
        self.steps = 0

    def step(self, n: int) -> None:
        t, ens = self.trainer, self.trainer.ens
        bs = t.batch_size
        ens.train()
        for _ in range(n):
            if self.pos + bs > self.perm.shape[1]:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = t.permutations(self.epoch)
            idx = self.perm[:, self.pos:self.pos + bs]
            self.pos += bs
            t.optimizer.zero_grad(set_to_none=True)
            out = ens(t.X[idx.t()], batch_major=True)  # [M, bs, K]
            per_sample = F.cross_entropy(out.reshape(-1, out.shape[-1]), t.Y[idx].reshape(-1),
                                         reduction="none")
            per_sample.view(ens.n_members, -1).mean(1).sum().backward()
            t.optimizer.step()
            self.steps += 1

    def state_dict(self) -> dict:
        """The position in the members' data order (the trainer saves the rest)."""
        return {"epoch": self.epoch, "pos": self.pos, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.steps = state["epoch"], state["pos"], state["steps"]
        self.perm = self.trainer.permutations(self.epoch)


def mixing_index(p_holm: list[float], alpha: float = ALPHA) -> int | None:
    """The first evaluation from which on every corrected p is ≥ alpha (None if the last
    one is still separated)."""
    idx = None
    for i in range(len(p_holm) - 1, -1, -1):
        if p_holm[i] < alpha:
            break
        idx = i
    return idx


def summarize(per_lambda: dict[str, dict], grid: list[float]) -> dict:
    """Mixing time per λe, the spread across λe and the verdict of the docstring."""
    lams, g_mix = [], []
    out: dict = {"per_lambda": {}}
    for key, r in per_lambda.items():
        i = mixing_index(r["p_holm"])
        lam = r["lambda_e"]
        entry = {"mixed": i is not None,
                 "steps_times_lambda": grid[i] if i is not None else None,
                 "bracket": ([grid[i - 1] if i > 0 else None, grid[i]] if i is not None
                             else [grid[-1], None]),
                 "mixing_steps": r["steps"][i] if i is not None else None}
        out["per_lambda"][key] = entry
        lams.append(lam)
        g_mix.append(grid[i] if i is not None else math.inf)
    mixed = [g for g in g_mix if math.isfinite(g)]
    all_mixed = len(mixed) == len(g_mix)
    out["all_mixed"] = all_mixed
    ratio = None  # None: no resolution (nothing mixed, or already at step 0)
    if mixed and min(mixed) > 0:
        # a λe that never mixed counts at the horizon: a lower bound on its t_mix·λe
        ratio = (max(mixed) if all_mixed else grid[-1]) / min(mixed)
    out["ratio_max_over_min"] = ratio
    if all_mixed and len(mixed) >= 2 and min(mixed) > 0:
        slope = np.polyfit(np.log(lams), np.log(np.array(g_mix) / np.array(lams)), 1)[0]
        out["slope_log_tmix_vs_log_lambda"] = float(slope)
    else:
        out["slope_log_tmix_vs_log_lambda"] = None
    out["falsify_factor"] = FALSIFY_FACTOR
    out["claim_falsified"] = bool(ratio is not None and ratio > FALSIFY_FACTOR)
    out["claim_supported"] = bool(all_mixed and ratio is not None and ratio <= FALSIFY_FACTOR)
    return out


def run(ctx: RunContext) -> dict:
    c = ctx.config
    if c["init"] not in ("shared", "independent"):
        raise ValueError(f"{NAME}: init must be 'shared' or 'independent', got {c['init']!r}")
    if c["members"] < 2:
        raise ValueError(f"{NAME}: members must be >= 2 per history, got {c['members']}")
    grid = list(c["grid"])
    if grid[0] != 0.0 or sorted(grid) != grid:
        raise ValueError(f"{NAME}: grid must be increasing and start at 0, got {grid}")
    X, Y, Xt, Yt = load_dataset(ctx.data, ctx.data_root, ctx.device)
    if c["train_subset"]:
        X, Y = X[:c["train_subset"]], Y[:c["train_subset"]]
    X_bn = X if c["bn_points"] is None else X[:c["bn_points"]]
    num_classes = int(max(int(Y.max()), int(Yt.max()))) + 1
    d_in = X[0].numel()
    names = list(c["histories"])
    m = c["members"]
    margin = equivalence_margin(c["accuracy_gap"], num_classes)
    # resumable at every evaluation: the finished λe's records, and for the λe in progress
    # its trainer (members, optimizer), the step position and the record so far
    state = ctx.restore()
    per_lambda: dict[str, dict] = dict(state["per_lambda"]) if state else {}
    current = state["current"] if state else None
    bar = ctx.progress_bar(c["lambdas"], desc=NAME, unit="λe")
    for j, lam in enumerate(bar):
        if f"{lam:g}" in per_lambda:
            continue
        ens = Ensemble(lambda: normalized_mlp(d_in, c["hidden"], num_classes),
                       len(names) * m, init=c["init"], seed=ctx.seed).to(ctx.device)
        named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
        opt = FusedSGDWD(named, lr=0.0, momentum=0.0, weight_decay=0.0)
        trainer = EnsembleTrainer(ens, opt, (X, Y), c["batch_size"], seed=ctx.seed,
                                  progress=False)
        stepper = StepTrainer(trainer)
        targets = [round(g / lam) for g in grid]
        if current is not None and current["j"] == j:
            trainer.load_state_dict(current["trainer"])
            stepper.load_state_dict(current["stepper"])
            rec, done, first = current["rec"], current["done"], current["i"]
        else:
            pre_lr = torch.tensor([c["histories"][n][0] for n in names],
                                  dtype=torch.float64).repeat_interleave(m)
            pre_wd = torch.tensor([c["histories"][n][1] for n in names],
                                  dtype=torch.float64).repeat_interleave(m)
            trainer.set_hparams(pre_lr, pre_wd)
            stepper.step(c["pre_steps"])
            rec = {"lambda_e": lam, "lr": lam / c["wd"], "wd": c["wd"], "steps": [],
                   "grid": grid, "p": [], "l1": [], "null_mean_l1": [], "d2": [],
                   "d2_low": [], "d2_high": [], "test_accuracy": {n: [] for n in names}}
            done, first = 0, 0
        trainer.set_hparams(lam / c["wd"], c["wd"])
        for i in range(first, len(targets)):
            t = targets[i]
            stepper.step(t - done)
            done = t
            preds = recalibrated_predict(ens, X_bn, Xt, batch_size=c["batch_size"])
            a, b = preds[:m], preds[m:]
            seed = (ctx.seed * 100 + j) * 100 + i
            pt = permutation_test(a, b, num_classes, n_permutations=c["n_permutations"],
                                  generator=2 * seed)
            bs = d2_bootstrap(a, b, num_classes, n_bootstrap=c["n_bootstrap"],
                              generator=2 * seed + 1)
            rec["steps"].append(t)
            rec["p"].append(pt.p_value)
            rec["l1"].append(pt.statistic)
            rec["null_mean_l1"].append(pt.null_mean)
            rec["d2"].append(bs.estimate)
            rec["d2_low"].append(bs.low)
            rec["d2_high"].append(bs.high)
            for n, part in zip(names, (a, b)):
                rec["test_accuracy"][n].append(float((part == Yt.cpu()).double().mean()))
            if i + 1 < len(targets):
                ctx.checkpoint({"per_lambda": per_lambda, "current": {
                    "j": j, "i": i + 1, "done": done, "rec": rec,
                    "trainer": trainer.state_dict(), "stepper": stepper.state_dict()}})
        rec["p_holm"] = holm(rec["p"]).tolist()
        per_lambda[f"{lam:g}"] = rec
        current = None
        ctx.checkpoint({"per_lambda": per_lambda, "current": None})
    summary = summarize(per_lambda, grid)
    for key, entry in summary["per_lambda"].items():
        per_lambda[key].update(entry)
    del summary["per_lambda"]
    return {"lambdas": per_lambda, "equivalence_margin": margin, "alpha": ALPHA, **summary}


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(1, 3)
    lams = result["lambdas"]
    for i, (key, r) in enumerate(lams.items()):
        ax[0, 0].semilogy(r["grid"], r["p_holm"], marker="o", ms=3, color=f"C{i}",
                          label=f"λe = {key}")
        d2 = np.array(r["d2"])
        err = np.stack([d2 - np.array(r["d2_low"]), np.array(r["d2_high"]) - d2])
        ax[0, 1].errorbar(np.array(r["grid"]) * (1 + 0.01 * i), d2, yerr=err, marker="o",
                          ms=3, capsize=2, color=f"C{i}", label=f"λe = {key}")
    ax[0, 0].axhline(result["alpha"], color="k", ls="--", lw=0.8, label="α = 0.05")
    ax[0, 0].set(xlabel="λe · steps", ylabel="permutation p, hot vs cold (Holm)",
                 title="separated?")
    margin = result["equivalence_margin"]
    ax[0, 1].axhline(margin, color="k", ls="--", lw=0.8, label=f"margin {margin:.1e}")
    ax[0, 1].set_yscale("symlog", linthresh=margin / 4)
    ax[0, 1].set(xlabel="λe · steps", ylabel="debiased D² (95 % CI)", title="effect size")
    x, y, lo, hi = [], [], [], []
    for r in lams.values():
        lam = r["lambda_e"]
        if r["mixed"]:
            g = r["steps_times_lambda"]
            below = r["bracket"][0] if r["bracket"][0] is not None else 0.0
            x.append(lam), y.append(g), lo.append(g - below), hi.append(0.0)
        else:
            ax[0, 2].annotate(f"not mixed by {r['grid'][-1]:g}", (lam, r["grid"][-1]),
                              fontsize=7, rotation=90, va="bottom")
            ax[0, 2].plot([lam], [r["grid"][-1]], marker="^", color="C3")
    if x:
        ax[0, 2].errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, ls="-",
                          label="t_mix · λe (bar: back to the previous grid point)")
        ref = min(y)
        ax[0, 2].fill_between([min(c["lambdas"]) / 1.3, max(c["lambdas"]) * 1.3],
                              [ref] * 2, [ref * result["falsify_factor"]] * 2, alpha=0.15,
                              color="grey", label="within √8 of the smallest")
    ax[0, 2].set(xscale="log", xlabel="λe", ylabel="mixing steps × λe",
                 title="flat if mixing takes O(1/λe) steps")
    for a in ax[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    ratio = result["ratio_max_over_min"]
    verdict = ("falsified" if result["claim_falsified"] else
               "supported" if result["claim_supported"] else "undetermined")
    save_figure(fig, path, f"{c['members']} + {c['members']} members per λe: max/min of "
                           f"t_mix·λe = {ratio if ratio is None else round(ratio, 2)} "
                           f"(falsified above √8): {verdict}")
