"""fig3-swa: at a fixed LR, SGD keeps moving; averaging its snapshots (SWA) beats each one.

Claim (paper, Fig. 3). With a fixed learning rate (plus weight decay and momentum) the
weights of a scale-invariant network do not settle, and they do not diffuse inside a
fixed region either: the ℓ2 distance between the snapshots of epochs T and T+Δ grows
monotonically with the lag Δ. Still, the *average* of the snapshots of one run
(stochastic weight averaging) is a better network than its single snapshots — because
they lie in one basin, which the control below checks: averaging snapshots of runs from
*different* initializations must not help.

Setup (ours):

* ``runs`` independent runs (different initializations, each its own data order), all in
  one :class:`~scaleinv_kernels.ensemble.Ensemble` trained by one
  :class:`~scaleinv_kernels.ensemble.EnsembleTrainer`: SGD (FusedSGDWD) with fixed LR
  ``lr``, momentum ``momentum``, coupled weight decay ``weight_decay``, batch
  ``batch_size``, ``epochs`` epochs, a snapshot of every run at the end of every epoch.
  Quick: the BatchNorm MLP (:func:`~scaleinv_kernels.experiments.training.normalized_mlp`,
  784 → 128 → 128, frozen random last layer) on MNIST-5k, 4 runs, η = 0.1, μ = 0.9,
  λ = 1e-2 (the norm equilibrates within ≈ (1−μ)/(2ηλ) = 50 steps), 40 epochs.
  ``full`` (for a GPU; not run here): ``normalized_cnn``, λ = 5e-4, 200 epochs, 25-epoch
  windows.
* Accuracy of any weights (a snapshot or an average) is the test accuracy in eval mode
  with the BatchNorm statistics recomputed on the first ``bn_images`` training images for
  those weights (``average_weights``), so single snapshots and averages are treated alike.
* Distances: per run, ``pairwise_distances`` of its snapshots over the trainable weights;
  ``distance_vs_lag[Δ−1]`` = mean over runs and over t ≥ ``distance_from`` of
  ‖w(t) − w(t+Δ)‖; ``monotone``: that mean curve is strictly increasing;
  ``monotone_by_start[r][k]``: the row ‖w(T) − w(T+Δ)‖, Δ = 1, 2, … of run r from start
  T = ``distance_from`` + k is strictly increasing (every start, not only the mean).
* Angles: ``angle_vs_lag[layer][Δ−1]`` = mean over runs and t ≥ ``distance_from`` of the
  angle between w_l(t) and w_l(t+Δ) per trainable layer; ``angle_cross_init[layer]`` =
  mean angle between different runs' weights at the same epoch (the decorrelated level,
  ≈ π/2 in high dimension).
* SWA over windows of fixed length ``swa_window``: for each start T in
  ``swa_start_epochs``, each run's average of its snapshots T … T+``swa_window``−1, against
  the mean and the best of its single snapshots in that window (means over runs).
* Control: for each epoch t in ``control_epochs``, the average of the ``runs`` snapshots
  of epoch t (different initializations), against the mean single-snapshot accuracy of
  epoch t.

What would falsify each claim, and the rule the run applies (``claims``):

* "keeps moving": the mean distance stops growing with the lag (``monotone`` false), or
  the distance from some start T shows no upward trend with the lag
  (``rank_correlation_by_start``: Spearman ρ between Δ and ‖w(T) − w(T+Δ)‖, over starts
  with ≥ 2 lags; ``min_rank_correlation`` ≤ 0.5), or the per-layer angles reach the
  decorrelated level (``max_angle_fraction`` = largest angle_vs_lag / angle_cross_init
  ≥ 0.9: the directions would then be unrelated, i.e. diffusing over the whole sphere,
  not drifting from where they were). Strict monotonicity of every start's row
  (``monotone_fraction``) is reported but not required: the SGD noise of one snapshot
  (the distance at Δ = 1) is far larger than the drift added by one more epoch, so
  neighbouring lags of a single row cross even while the row trends upward.
* "SWA beats single snapshots": in some window the SWA average does not beat the best of
  its own snapshots (``swa_beats_best`` false in any window; ``swa_beats_mean`` is the
  weaker form).
* control "averaging different inits does not help": the cross-init average scores at
  least the mean single snapshot at some control epoch (``control_no_gain`` false).

Measured (quick: ``python -m scaleinv_kernels.experiments fig3-swa --preset quick --out
out --threads 1``, seed 0; AMD EPYC with AVX2, 2 cores shared with other jobs, torch 2.13;
126 s). The total norm settles at ≈ 4.7 by epoch 5. Single snapshots from epoch 10 on
score 93.3–96.0 % (mean 94.9 %). SWA over the fixed windows 10–19, 20–29, 30–39: 96.0,
96.2, 96.3 % (run means; every run 95.9–96.6 %) against the best single snapshot of the
window 95.5, 95.7, 95.6 % and the window mean 94.8, 94.9, 94.9 % — ``swa_beats_best``
true in every window. Control: averaging the 4 runs' snapshots of the same epoch gives
62.7, 67.1, 66.6, 60.7 % at epochs 10, 20, 30, 39 against 94.6–95.0 % for the single
snapshots — a large loss, ``control_no_gain`` true, so the SWA gain comes from
snapshots sharing a basin. Distance: the mean ‖w(t) − w(t+Δ)‖ grows monotonically from
1.58 at Δ = 1 to 3.13 at Δ = 29 (``monotone`` true, no plateau); strictly monotone rows:
only 17 % of the 116 (run, start) pairs, but every row trends upward (Spearman ρ ≥ 0.80,
``min_rank_correlation``). Angles: fc1 0.35 → 0.72 rad, fc2 0.30 → 0.58 rad from Δ = 1
to 29, still rising, against 1.56–1.57 rad between different inits
(``max_angle_fraction`` 0.46): the directions keep drifting and stay correlated with
where they were; no plateau at π/2 within 29 epochs. ``keeps_moving`` true.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.weight_space import pairwise_distances
from scaleinv_kernels.experiments.common import (
    RunContext,
    cpu_rng_state,
    figure,
    save_figure,
    set_rng_state,
)
from scaleinv_kernels.experiments.training import (
    load_data,
    model_factory,
    recomputed_bn_accuracy,
)
from scaleinv_kernels.optim import FusedSGDWD

NAME = "fig3-swa"
USES_DATA = True
_BASE = dict(model="mlp", hidden=128, runs=4, batch_size=128, lr=0.1, momentum=0.9,
             weight_decay=1e-2, bn_images=1000, checkpoint_every=10, n_train=None,
             n_test=None)
PRESETS = {
    "smoke": {**_BASE, "hidden": 16, "runs": 2, "n_train": 256, "n_test": 200,
              "bn_images": 256, "epochs": 6, "distance_from": 0, "swa_window": 3,
              "swa_start_epochs": [0, 3], "control_epochs": [2, 5], "checkpoint_every": 2},
    "quick": {**_BASE, "epochs": 40, "distance_from": 10, "swa_window": 10,
              "swa_start_epochs": [10, 20, 30], "control_epochs": [10, 20, 30, 39]},
    "full": {**_BASE, "model": "cnn", "hidden": None, "weight_decay": 5e-4, "epochs": 200,
             "bn_images": 10000, "distance_from": 50, "swa_window": 25,
             "swa_start_epochs": [50, 100, 150, 175], "control_epochs": [50, 100, 150, 199]},
}


# ---- statistics -------------------------------------------------------------------------
def distance_vs_lag(distances: torch.Tensor) -> list[float]:
    """Mean of ``distances[t, t+Δ]`` over t, for Δ = 1 .. T−1."""
    T = distances.shape[0]
    return [distances.diagonal(lag).mean().item() for lag in range(1, T)]


def strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def monotone_by_start(distances: torch.Tensor) -> list[bool]:
    """For every start T (all but the last snapshot): is ``distances[T, T+1:]`` strictly
    increasing? (One lag only: trivially True.)"""
    T = distances.shape[0]
    return [strictly_increasing(distances[t, t + 1:].tolist()) for t in range(T - 1)]


def rank_correlation(values: list[float]) -> float:
    """Spearman rank correlation between ``values`` and their positions 0, 1, …: 1 for a
    strictly increasing list, −1 for a strictly decreasing one (ties ranked by position;
    NaN for fewer than 2 values)."""
    if len(values) < 2:
        return math.nan
    rank = torch.tensor(values, dtype=torch.float64).argsort(stable=True).argsort().double()
    pos = torch.arange(len(values), dtype=torch.float64)
    rank, pos = rank - rank.mean(), pos - pos.mean()
    return float((rank * pos).sum() / (rank.norm() * pos.norm()))


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors as vectors, in radians: 2·atan2(‖â − b̂‖, ‖â + b̂‖) with
    â = a/‖a‖, accurate near 0 and π (acos of the cosine, or the Lagrange identity, would
    round small angles to 0)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if not (bool(a.any()) and bool(b.any())):
        raise ValueError("angle: undefined for a zero tensor")
    a, b = a / a.norm(), b / b.norm()
    return 2.0 * math.atan2(float((a - b).norm()), float((a + b).norm()))


def angle_vs_lag(snapshots: list[torch.Tensor]) -> list[float]:
    """Mean over t of angle(w(t), w(t+Δ)), for Δ = 1 .. T−1 (one layer's snapshots)."""
    T = len(snapshots)
    return [sum(angle(snapshots[t], snapshots[t + lag]) for t in range(T - lag)) / (T - lag)
            for lag in range(1, T)]


def claims(r: dict) -> dict:
    """The falsification rules of the module doc applied to a result's numbers."""
    starts = [x for run in r["monotone_by_start"] for x in run]
    frac = sum(starts) / len(starts)
    # starts with at least two lags (a single lag has no trend)
    rhos = [x for run in r["rank_correlation_by_start"] for x in run[:-1]]
    min_rho = min(rhos)
    max_angle = max(max(v) / r["angle_cross_init"][k] for k, v in r["angle_vs_lag"].items())
    swa = r["swa"]
    beats_best = all(w["swa"] > w["best_single"] for w in swa.values())
    beats_mean = all(w["swa"] > w["mean_single"] for w in swa.values())
    no_gain = all(x["cross_init_average"] < x["mean_single"] for x in r["control"].values())
    moving = r["monotone"] and min_rho > 0.5 and max_angle < 0.9
    return {"monotone_fraction": frac, "min_rank_correlation": min_rho,
            "max_angle_fraction": max_angle,
            "keeps_moving": bool(moving), "swa_beats_best": bool(beats_best),
            "swa_beats_mean": bool(beats_mean), "control_no_gain": bool(no_gain)}


# ---- run ------------------------------------------------------------------------------
def run(ctx: RunContext) -> dict:
    c = ctx.config
    E, R, W = c["epochs"], c["runs"], c["swa_window"]
    if E < 3 or not 0 <= c["distance_from"] <= E - 3:
        raise ValueError(f"{NAME}: need epochs >= 3 and 0 <= distance_from <= epochs - 3, "
                         f"got {E}, {c['distance_from']}")
    if R < 2:
        raise ValueError(f"{NAME}: the control needs runs >= 2, got {R}")
    if W < 2 or any(not 0 <= t <= E - W for t in c["swa_start_epochs"]):
        raise ValueError(f"{NAME}: swa_window must be >= 2 and every window "
                         f"[T, T+{W}) of swa_start_epochs {c['swa_start_epochs']} must lie "
                         f"in [0, {E})")
    if any(not 0 <= t < E for t in c["control_epochs"]):
        raise ValueError(f"{NAME}: control_epochs {c['control_epochs']} must lie in [0, {E})")
    x, y, x_test, y_test = load_data(ctx, c["n_train"], c["n_test"])
    factory = model_factory(c["model"], x, c["hidden"])
    ens = Ensemble(factory, R, init="independent", seed=ctx.seed).to(ctx.device)
    named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=c["lr"], momentum=c["momentum"],
                     weight_decay=c["weight_decay"])
    trainer = EnsembleTrainer(ens, opt, (x, y), c["batch_size"], seed=ctx.seed,
                              progress=False)
    template = ens.member(0)
    trainable = [n for n, p in template.named_parameters() if p.requires_grad]
    snapshots: list[list[dict]] = [[] for _ in range(R)]  # [run][epoch] → state_dict
    train_loss: list[list[float]] = []
    state = ctx.restore()
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        snapshots, train_loss = state["snapshots"], state["train_loss"]
        set_rng_state(state["rng"])
    for epoch in ctx.progress_bar(range(trainer.epoch, E), initial=trainer.epoch, total=E):
        record = trainer.fit(1)[0]
        train_loss.append(record["train_loss"].double().tolist())
        sd = ens.net.state_dict()
        for r in range(R):
            snapshots[r].append({k: v[r].detach().clone() for k, v in sd.items()})
        done = epoch + 1
        if done % c["checkpoint_every"] == 0 and done < E:
            ctx.checkpoint({"trainer": trainer.state_dict(), "snapshots": snapshots,
                            "train_loss": train_loss, "rng": cpu_rng_state()})

    x_bn = x[:c["bn_images"]]

    def acc(states: list[dict]) -> float:
        return recomputed_bn_accuracy(states, template, x_bn, x_test, y_test)

    single = [[acc([s]) for s in snaps] for snaps in snapshots]  # [R][E]
    swa = {}
    for t in c["swa_start_epochs"]:
        per_run = [(acc(snapshots[r][t:t + W]), max(single[r][t:t + W]),
                    sum(single[r][t:t + W]) / W) for r in range(R)]
        swa[str(t)] = {"window": [t, t + W - 1],
                       "swa_per_run": [p[0] for p in per_run],
                       "swa": sum(p[0] for p in per_run) / R,
                       "best_single": sum(p[1] for p in per_run) / R,
                       "mean_single": sum(p[2] for p in per_run) / R}
    control = {str(t): {"cross_init_average": acc([snapshots[r][t] for r in range(R)]),
                        "mean_single": sum(single[r][t] for r in range(R)) / R}
               for t in c["control_epochs"]}

    d0 = c["distance_from"]
    dists = [pairwise_distances(snaps, keys=trainable) for snaps in snapshots]  # R × [E, E]
    lag_per_run = [distance_vs_lag(d[d0:, d0:]) for d in dists]
    lag = [sum(v) / R for v in zip(*lag_per_run)]
    angles = {k: [sum(v) / R for v in zip(*(angle_vs_lag([s[k] for s in snaps[d0:]])
                                              for snaps in snapshots))]
              for k in trainable}
    pairs = [(a, b) for a in range(R) for b in range(a + 1, R)]
    cross = {k: sum(angle(snapshots[a][t][k], snapshots[b][t][k])
                    for a, b in pairs for t in range(d0, E)) / (len(pairs) * (E - d0))
             for k in trainable}
    norms = [[math.sqrt(sum(float(s[k].double().pow(2).sum()) for k in trainable))
              for s in snaps] for snaps in snapshots]
    result = {"epochs": list(range(E)), "train_loss": train_loss, "weight_norm": norms,
              "layers": trainable, "snapshot_test_accuracy": single, "swa": swa,
              "control": control, "distances": dists, "distance_vs_lag": lag,
              "distance_vs_lag_per_run": lag_per_run,
              "monotone": strictly_increasing(lag),
              "monotone_by_start": [monotone_by_start(d[d0:, d0:]) for d in dists],
              "rank_correlation_by_start": [
                  [rank_correlation(d[t, t + 1:].tolist()) for t in range(d0, E - 1)]
                  for d in dists],
              "angle_vs_lag": angles, "angle_cross_init": cross}
    result["claims"] = claims(result)
    return result


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(1, 3)
    ep = result["epochs"]
    single = result["snapshot_test_accuracy"]
    for r, accs in enumerate(single):
        ax[0, 0].plot(ep, [100 * a for a in accs], "-", lw=0.7, color=f"C{r}", alpha=0.7,
                      label="single snapshots (one line per run)" if r == 0 else None)
    for k, w in enumerate(result["swa"].values()):
        a, b = w["window"]
        ax[0, 0].hlines(100 * w["swa"], a, b, color="k", lw=2,
                        label=f"SWA over {c['swa_window']} epochs (run mean)" if k == 0 else None)
        ax[0, 0].hlines(100 * w["best_single"], a, b, color="k", lw=1, ls=":",
                        label="best single in window (run mean)" if k == 0 else None)
    ctl = result["control"]
    ax[0, 0].plot([int(t) for t in ctl], [100 * v["cross_init_average"] for v in ctl.values()],
                  "rx", ms=7, label="average of different inits (control)")
    ax[0, 0].set(xlabel="epoch", ylabel="test accuracy [%]",
                 title="snapshots, SWA, control (BN recomputed)")
    lag = result["distance_vs_lag"]
    for r, v in enumerate(result["distance_vs_lag_per_run"]):
        ax[0, 1].plot(range(1, len(v) + 1), v, lw=0.7, color=f"C{r}", alpha=0.6)
    ax[0, 1].plot(range(1, len(lag) + 1), lag, "ko-", ms=3, label="mean over runs")
    cl = result["claims"]
    ax[0, 1].set(xlabel="lag Δ [epochs]", ylabel="‖w(t) − w(t+Δ)‖",
                 title=f"distance vs lag; monotone {result['monotone']}, "
                       f"per start {cl['monotone_fraction']:.0%}")
    for k, (layer, v) in enumerate(result["angle_vs_lag"].items()):
        ax[0, 2].plot(range(1, len(v) + 1), v, "o-", ms=3, color=f"C{k}", label=layer)
        ax[0, 2].axhline(result["angle_cross_init"][layer], color=f"C{k}", ls=":", lw=1)
    ax[0, 2].axhline(math.pi / 2, color="k", ls="--", lw=0.8, label="π/2")
    ax[0, 2].set(xlabel="lag Δ [epochs]", ylabel="∠(w_l(t), w_l(t+Δ)) [rad]",
                 title="per-layer angle vs lag (dotted: across inits)")
    for a in ax[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    save_figure(fig, path, f"Fixed LR η={c['lr']:g}, μ={c['momentum']:g}, "
                           f"λ={c['weight_decay']:g}, {c['runs']} runs, {c['model'].upper()} "
                           f"on {result['data']} (distances from epoch {c['distance_from']})")
