"""equilibrium-norm: the angular update and effective LR settle where the theory says.

Claim (Wan et al. 2021; Li & Arora 2020). A scale-invariant weight trained with SGD
(LR η, momentum μ) and weight decay λ reaches a steady state after O(1/(ηλ)) steps in
which its angular update per step is θ* = √(2ηλ/(1+μ)) and its effective LR η/‖w‖² is
θ*·√(1−μ²)/‖∇̃L‖, ∇̃L the gradient at unit weight norm (see
:func:`scaleinv_kernels.theory.predicted_angular_update` and
:func:`~scaleinv_kernels.theory.predicted_effective_lr`).

Setup. For each (η, λ, μ) of the preset, ``normalized_cnn`` (widths ``channels``) trains on
MNIST-5k (batch ``batch_size``, full batches only, reshuffled every epoch, same seed for
every run) with :class:`~scaleinv_kernels.FusedSGDWD`; a
:class:`~scaleinv_kernels.StatsRecorder` keeps every step's per-layer statistics. Over the
last ``tail`` fraction of the steps, per conv layer, we average the angular update, the
effective LR and the unit-norm gradient norm ‖∇̃L‖ = ‖∇L‖·‖w‖, and compare the first two
with the predictions (the effective-LR prediction uses the measured mean ‖∇̃L‖, so it tests
the norm balance, not the size of the gradient). ``rel_error`` = measured/predicted − 1.
Combinations are chosen so that ηλ/(1−μ) ≥ 0.005: the norm settles within ~100 steps and
most of each run is at equilibrium.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scaleinv_kernels.data import load_mnist5k
from scaleinv_kernels.experiments.common import RunContext, figure, save_figure
from scaleinv_kernels.optim import FusedSGDWD, StatsRecorder
from scaleinv_kernels.scale_invariance import normalized_cnn
from scaleinv_kernels.theory import predicted_angular_update, predicted_effective_lr

NAME = "equilibrium-norm"
USES_DATA = True
_COMBOS = [
    dict(lr=0.1, weight_decay=1e-2, momentum=0.9),
    dict(lr=0.05, weight_decay=1e-2, momentum=0.9),
    dict(lr=1.0, weight_decay=1e-2, momentum=0.0),
    dict(lr=0.5, weight_decay=1e-2, momentum=0.0),
]
PRESETS = {
    "smoke": {"combos": [_COMBOS[0], _COMBOS[2]], "channels": [4, 8, 8], "batch_size": 32,
              "steps": 40, "tail": 0.5},
    "quick": {"combos": _COMBOS, "channels": [16, 32, 32], "batch_size": 128, "steps": 600,
              "tail": 0.5},
    "full": {"combos": _COMBOS + [dict(lr=0.1, weight_decay=5e-4, momentum=0.9),
                                  dict(lr=0.1, weight_decay=5e-3, momentum=0.0)],
             "channels": [16, 32, 32], "batch_size": 128, "steps": 20000, "tail": 0.25},
}


def train_one(x: torch.Tensor, y: torch.Tensor, hp: dict, c: dict, seed: int,
              progress) -> tuple[list[str], dict[str, np.ndarray]]:
    """Train one net with FusedSGDWD for ``c["steps"]`` steps; every step's statistics."""
    torch.manual_seed(seed)
    model = normalized_cnn(channels=tuple(c["channels"])).to(x.device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=hp["lr"], momentum=hp["momentum"],
                     weight_decay=hp["weight_decay"])
    rec = StatsRecorder(opt, every=1)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // c["batch_size"]
    perm = torch.randperm(len(x), generator=gen)
    for t in progress(range(c["steps"])):
        if t % per_epoch == 0 and t:
            perm = torch.randperm(len(x), generator=gen)
        b = t % per_epoch
        idx = perm[b * c["batch_size"]:(b + 1) * c["batch_size"]].to(x.device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return rec.names, rec.to_numpy()


def run(ctx: RunContext) -> dict:
    c = ctx.config
    if ctx.data != "mnist5k":
        raise ValueError(f"equilibrium-norm: only --data mnist5k is supported, got "
                         f"{ctx.data!r}")
    x, y, _, _ = load_mnist5k(ctx.device)
    runs = []
    for k, hp in enumerate(c["combos"]):
        names, rec = train_one(x, y, hp, c, ctx.seed,
                               lambda it, k=k: ctx.progress_bar(it, desc=f"run {k}"))
        tail = max(1, int(round(c["tail"] * len(rec["step"]))))
        au = rec["angular_update"].astype(np.float64)
        elr = rec["effective_lr"].astype(np.float64)
        unit_g = (rec["grad_norm"] * rec["weight_norm"]).astype(np.float64)
        m_au, m_elr, m_g = (np.mean(a[-tail:], axis=0) for a in (au, elr, unit_g))
        p_au = predicted_angular_update(hp["lr"], hp["weight_decay"], hp["momentum"])
        p_elr = np.asarray([predicted_effective_lr(hp["lr"], hp["weight_decay"],
                                                   hp["momentum"], unit_grad_norm=float(g))
                            for g in m_g])
        runs.append({
            "hparams": dict(hp),
            "layers": names,
            "intrinsic_lr": hp["lr"] * hp["weight_decay"],
            "tail_steps": tail,
            "measured": {"angular_update": dict(zip(names, m_au)),
                         "effective_lr": dict(zip(names, m_elr)),
                         "unit_grad_norm": dict(zip(names, m_g))},
            "predicted": {"angular_update": p_au,
                          "effective_lr": dict(zip(names, p_elr))},
            "rel_error": {"angular_update": dict(zip(names, m_au / p_au - 1)),
                          "effective_lr": dict(zip(names, m_elr / p_elr - 1))},
            "curves": {"step": rec["step"], "angular_update": au.T, "effective_lr": elr.T},
        })
    errors = [abs(v) for r in runs for d in r["rel_error"].values() for v in d.values()]
    return {
        "runs": runs,
        "max_rel_error": max(errors),
        "max_rel_error_angular_update": max(abs(v) for r in runs
                                            for v in r["rel_error"]["angular_update"].values()),
        "max_rel_error_effective_lr": max(abs(v) for r in runs
                                          for v in r["rel_error"]["effective_lr"].values()),
    }


def plot(result: dict, path: Path) -> None:
    runs = result["runs"]
    fig, ax = figure(1, len(runs), size=(4.2, 3.4))
    for a, r in zip(ax[0], runs):
        steps = r["curves"]["step"]
        width = max(1, len(steps) // 40)
        kernel = np.ones(width) / width
        for name, curve in zip(r["layers"], r["curves"]["angular_update"]):
            curve = np.asarray(curve, dtype=float)
            a.plot(steps, curve, lw=0.4, alpha=0.25)
            smooth = np.convolve(curve, kernel, mode="valid")
            a.plot(steps[width - 1:], smooth, lw=1.2, color=a.lines[-1].get_color(),
                   label=name)
        a.axhline(r["predicted"]["angular_update"], color="k", ls="--", lw=1.2,
                  label="√(2ηλ/(1+μ))")
        hp = r["hparams"]
        a.set(xlabel="step", ylabel="angular update [rad]", yscale="log",
              title=f"η={hp['lr']:g}, λ={hp['weight_decay']:g}, μ={hp['momentum']:g}")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    save_figure(fig, path, "normalized CNN on MNIST-5k: equilibrium angular update (max "
                           f"relative error {result['max_rel_error_angular_update']:.1%}; "
                           "effective LR: "
                           f"{result['max_rel_error_effective_lr']:.0%}, see result.json)")
