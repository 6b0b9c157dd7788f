"""fig1-toy: gradient descent on L(x, y) = x²/(x²+y²) never converges with weight decay.

Claim (paper, Fig. 1 left). The toy loss is scale-invariant: L(c·w) = L(w), so its
gradient is orthogonal to w and shrinks as 1/‖w‖. Gradient descent without weight decay
grows ‖w‖ (each step adds an orthogonal component) and converges to the minimum y-axis
direction with a vanishing effective step η/‖w‖². With weight decay λ the norm shrinks
until the effective step is so large that an update overshoots: the loss spikes, the
norm jumps up, and the cycle repeats — GD+WD never settles.

Setup (the appendix's exact values are not public; these are ours): w₀ = (1, 0.1)·r₀,
plain GD (no momentum, no noise), lr η, weight decay λ, T steps; "converged" means the
loss stayed below ``tol`` over the last quarter of the run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaleinv_kernels.experiments.common import RunContext, figure, save_figure

NAME = "fig1-toy"
USES_DATA = False
_BASE = dict(lr=0.1, weight_decay=0.05, w0=(1.0, 0.1), tol=1e-3)
PRESETS = {
    "smoke": {**_BASE, "steps": 3000},
    "quick": {**_BASE, "steps": 20000},
    "full": {**_BASE, "steps": 100000},
}


def toy_loss(w: torch.Tensor) -> torch.Tensor:
    """L(x, y) = x² / (x² + y²) (float64)."""
    return w[0] ** 2 / (w[0] ** 2 + w[1] ** 2)


def gradient_descent(w0, lr: float, weight_decay: float, steps: int):
    """Plain GD with coupled weight decay; returns (loss, norm, trajectory) per step."""
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    losses, norms, path = [], [], []
    for _ in range(steps):
        loss = toy_loss(w)
        (g,) = torch.autograd.grad(loss, w)
        losses.append(float(loss.detach()))
        norms.append(float(w.detach().norm()))
        path.append(w.detach().clone())
        with torch.no_grad():
            w -= lr * (g + weight_decay * w)
    return losses, norms, torch.stack(path)


def run(ctx: RunContext) -> dict:
    c = ctx.config
    out = {}
    for key, wd in (("wd", c["weight_decay"]), ("nowd", 0.0)):
        loss, norm, path = gradient_descent(c["w0"], c["lr"], wd, c["steps"])
        tail = loss[-max(1, c["steps"] // 4):]
        out[f"loss_{key}"] = loss
        out[f"norm_{key}"] = norm
        out[f"trajectory_{key}"] = path[:: max(1, c["steps"] // 2000)].tolist()
        out[f"converged_{key}"] = bool(max(tail) < c["tol"])
        out[f"spikes_{key}"] = int(sum(1 for a, b in zip(loss, loss[1:])
                                       if a < c["tol"] <= b))
    return out


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(1, 3)
    for key, label in (("wd", f"WD λ={c['weight_decay']}"), ("nowd", "no WD")):
        traj = torch.tensor(result[f"trajectory_{key}"])
        ax[0, 0].plot(traj[:, 0], traj[:, 1], lw=0.8, label=label)
        ax[0, 1].semilogy(result[f"norm_{key}"], lw=0.8, label=label)
        ax[0, 2].semilogy([max(v, 1e-12) for v in result[f"loss_{key}"]], lw=0.6, label=label)
    ax[0, 0].set(xlabel="x", ylabel="y", title="trajectory")
    ax[0, 1].set(xlabel="step", ylabel="‖w‖", title="weight norm")
    ax[0, 2].set(xlabel="step", ylabel="L(w)", title="loss (spikes never stop with WD)")
    for a in ax[0]:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    save_figure(fig, path, f"Toy loss x²/(x²+y²), GD lr={c['lr']}: with weight decay "
                           "it never converges")
