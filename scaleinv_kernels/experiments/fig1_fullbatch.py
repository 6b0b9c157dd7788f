"""fig1-fullbatch: full-batch GD + weight decay reaches 100 % train accuracy and loses it.

Claim (paper, Fig. 1 right). On a scale-invariant network, gradient descent with weight
decay shrinks ‖w‖ and so raises the effective learning rate η/‖w‖² until a step
overshoots: 100 % training accuracy is reached, then *lost* in a loss spike (the norm
jumps up, training recovers, the norm shrinks again, ... periodically). Once weight decay
is switched off, the norm stops shrinking, the effective learning rate stops growing, and
GD converges: accuracy returns to 100 % and stays there.

Setup (ours; chosen by measurement on a 2-core CPU, torch 2.13):

* The first ``n_train`` images of the training split; one step per epoch on all of them
  (full-batch GD, no momentum, no noise), lr η, coupled weight decay λ (FusedSGDWD,
  = torch.optim.SGD) until epoch ``wd_off_epoch``, then λ = 0.
* Model: :func:`~scaleinv_kernels.scale_invariance.normalized_cnn` for MNIST(-5k),
  :func:`~scaleinv_kernels.models.normalized_resnet` for ``--data cifar10``. The frozen
  classifier is multiplied by ``fc_scale`` (a fixed softmax temperature; the trainable
  convolutions stay scale-invariant): with PyTorch's default init the logits are
  O(0.5), and GD needed far more epochs than the CPU budget to fit the 1000 images.
* ``downsample`` > 1 average-pools the images by that factor (quick/smoke: 28×28 → 14×14,
  to fit the CPU budget); ``full`` uses the original resolution.
* BatchNorm stays in train mode throughout: the full-batch gradient is the gradient of
  the loss with batch statistics over the ``n_train`` images, and the train accuracy and
  loss are measured with the same batch statistics, i.e. on exactly the function the
  loss sees (eval mode would use running averages of past weights' statistics, a
  different function, which would blur the spikes). Each epoch's accuracy and loss are
  those of the weights *before* that epoch's step (the forward pass of the step itself).
* ``weight_norm``: ‖w‖ over all trainable tensors; ``effective_lr``: η/‖w_l‖² per layer.

Verdicts: ``reached_100`` — accuracy 1.0 at some epoch before ``wd_off_epoch``;
``lost_after_100`` — after the first such epoch and before ``wd_off_epoch`` it fell below
1.0; ``converged_after_wd_off`` — accuracy 1.0 at every one of the last
``converge_window`` epochs, all after ``wd_off_epoch``.

Measured (quick, MNIST-5k, seed 0, torch 2.13 CPU). With one thread
(``OMP_NUM_THREADS=1``, 29 s on the shared 2-core machine): 100 % at epoch 77, lost at
epoch 101; loss spikes at epochs ≈ 46 and 105, after ‖w‖ had shrunk to 7.5 and 5.5,
lifting it back to ≈ 9.1 and 9.4; WD off at 170, when the norm was again near its
minimum (5.4), so one more spike follows (epoch ≈ 178: switching WD off does not undo
the effective LR already reached), after which ‖w‖ stays at 9.9 and the accuracy is
100 % at every epoch from 217 on. With two threads (≈ 150 s there, the other jobs on
the machine slowing every 2-thread op): 100 % at 72, lost at 93, spikes at ≈ 54, 97,
162, 100 % from 217 on.
Thread counts change the float rounding, and GD near its stability edge amplifies it,
so the epochs differ; the behaviour does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from scaleinv_kernels.data import load_dataset
from scaleinv_kernels.experiments.common import (
    RunContext,
    cpu_rng_state,
    figure,
    save_figure,
    set_rng_state,
)
from scaleinv_kernels.models import model_for
from scaleinv_kernels.optim import FusedSGDWD

NAME = "fig1-fullbatch"
USES_DATA = True
_BASE = dict(lr=1.0, weight_decay=0.01, fc_scale=10.0, checkpoint_every=10)
PRESETS = {
    "smoke": {**_BASE, "n_train": 100, "downsample": 2, "weight_decay": 0.05,
              "epochs": 120, "wd_off_epoch": 70, "converge_window": 20, "checkpoint_every": 5},
    "quick": {**_BASE, "n_train": 1000, "downsample": 2, "epochs": 280, "wd_off_epoch": 170,
              "converge_window": 50},
    "full": {**_BASE, "n_train": 1000, "downsample": 1, "epochs": 1000, "wd_off_epoch": 600,
             "converge_window": 200},
}
_CURVES = ("train_acc", "train_loss", "weight_norm", "effective_lr")


def _check(c: dict) -> None:
    for key in ("n_train", "epochs", "wd_off_epoch", "converge_window", "checkpoint_every",
                "downsample"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"{NAME}: {key} must be a positive int, got {c[key]!r}")
    if not c["wd_off_epoch"] + c["converge_window"] <= c["epochs"]:
        raise ValueError(f"{NAME}: need wd_off_epoch + converge_window <= epochs, got "
                         f"{c['wd_off_epoch']} + {c['converge_window']} > {c['epochs']}")


def verdicts(acc: list[float], wd_off_epoch: int, converge_window: int) -> dict:
    """The three booleans of the claim from per-epoch train accuracies (see module doc)."""
    before = acc[:wd_off_epoch]
    first = next((i for i, a in enumerate(before) if a == 1.0), None)
    lost = next((i for i in range(first + 1, len(before)) if before[i] < 1.0),
                None) if first is not None else None
    tail = acc[-converge_window:]
    return {"reached_100": first is not None, "first_100_epoch": first,
            "lost_after_100": lost is not None, "first_lost_epoch": lost,
            "converged_after_wd_off": bool(len(acc) - converge_window >= wd_off_epoch
                                           and all(a == 1.0 for a in tail))}


def run(ctx: RunContext) -> dict:
    c = ctx.config
    _check(c)
    x, y, _, _ = load_dataset(ctx.data, ctx.data_root, ctx.device)
    if len(x) < c["n_train"]:
        raise ValueError(f"{NAME}: {ctx.data} has {len(x)} training images, "
                         f"n_train is {c['n_train']}")
    x, y = x[:c["n_train"]], y[:c["n_train"]]
    if c["downsample"] > 1:
        x = F.avg_pool2d(x, c["downsample"])

    torch.manual_seed(ctx.seed)
    model = model_for(ctx.data, c["fc_scale"]).to(ctx.device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=c["lr"], momentum=0.0, weight_decay=c["weight_decay"])
    curves: dict[str, list] = {k: [] for k in _CURVES}
    start = 0
    state = ctx.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        curves, start = state["curves"], state["epoch"]
        set_rng_state(state["rng"])

    for epoch in ctx.progress_bar(range(start, c["epochs"]), initial=start,
                                  total=c["epochs"]):
        if epoch == c["wd_off_epoch"]:
            for group in opt.param_groups:
                group["weight_decay"] = 0.0
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = opt.layer_stats()  # ‖w_t‖ of the weights the loss was evaluated at
        curves["train_acc"].append((out.argmax(1) == y).float().mean().item())
        curves["train_loss"].append(loss.item())
        curves["weight_norm"].append(stats.weight_norm.double().pow(2).sum().sqrt().item())
        curves["effective_lr"].append(stats.effective_lr.tolist())
        done = epoch + 1
        if done % c["checkpoint_every"] == 0 and done < c["epochs"]:
            ctx.checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "curves": curves, "epoch": done, "rng": cpu_rng_state()})

    names = list(opt.layer_stats().names)
    return {"epochs": list(range(c["epochs"])), "wd_off_epoch": c["wd_off_epoch"],
            **{k: curves[k] for k in ("train_acc", "train_loss", "weight_norm")},
            "effective_lr": {n: [row[i] for row in curves["effective_lr"]]
                             for i, n in enumerate(names)},
            **verdicts(curves["train_acc"], c["wd_off_epoch"], c["converge_window"])}


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    epochs, off = result["epochs"], result["wd_off_epoch"]
    fig, ax = figure(2, 2)
    ax[0, 0].plot(epochs, [100 * a for a in result["train_acc"]], lw=0.9)
    ax[0, 0].set(ylabel="train accuracy [%]", title="train accuracy (BN batch statistics)")
    ax[0, 1].semilogy(epochs, result["train_loss"], lw=0.9)
    ax[0, 1].set(ylabel="train loss", title="train loss")
    ax[1, 0].plot(epochs, result["weight_norm"], lw=0.9)
    ax[1, 0].set(ylabel="‖w‖", title="total weight norm")
    for name, values in result["effective_lr"].items():
        ax[1, 1].semilogy(epochs, values, lw=0.9, label=name)
    ax[1, 1].set(ylabel="η / ‖w_l‖²", title="effective LR per layer")
    ax[1, 1].legend(fontsize=7)
    for a in ax.flat:
        a.axvline(off, color="k", ls="--", lw=0.8)
        a.set_xlabel("epoch (= GD step)")
        a.grid(alpha=0.3)
    verdict = (f"100 % reached: {result['reached_100']}, lost before WD off: "
               f"{result['lost_after_100']}, converged after WD off: "
               f"{result['converged_after_wd_off']}")
    save_figure(fig, path, f"Full-batch GD on {c['n_train']} {result['data']} images, "
                           f"η={c['lr']:g}, λ={c['weight_decay']:g} until epoch {off} "
                           f"(dashed), then 0\n{verdict}")
