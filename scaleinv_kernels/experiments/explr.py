"""explr: weight decay on a scale-invariant net is an exponentially growing learning rate.

Claim (Li & Arora, ICLR 2020, Theorem 1.2). On a loss that is scale-invariant in every
trainable tensor, SGD with momentum μ, LR η and weight decay λ computes exactly the same
sequence of network functions as SGD with momentum μ, *no* weight decay and the LR
η̃_t = η·α^(−2t−1) (α the larger root of x² − (1+μ−ηλ)x + μ = 0), provided the no-WD run
starts with the momentum buffer (α−1)/(ηα)·w₀; the weights are related by w̃_t = α^(−t)·w_t
(:func:`scaleinv_kernels.theory.explr_schedule` states and proves it).

Setup. Two identical copies of a scale-invariant net (``normalized_cnn`` on MNIST-5k, or
for ``smoke`` a BatchNorm MLP 784→32→32→10 on flattened MNIST-5k, last layer frozen) train
on the same batches: copy A with :class:`~scaleinv_kernels.FusedSGDWD` (η, μ, λ), copy B
with ``torch.optim.SGD`` (μ, no WD) whose LR is set to η̃_t before step t and whose
momentum buffer is pre-set as the theorem requires. After every step we compare

* ``output_rel_diff``: ‖f_B(x) − f_A(x)‖ / ‖f_A(x)‖ on a fixed batch of test images;
* ``weight_ratio``: ‖w̃_t‖/‖w_t‖ of every trainable tensor, against ``predicted_ratio``
  α^(−t).

Choices. Everything runs in float64, and every BatchNorm uses batch statistics also for
the test batch (``track_running_stats=False``) with ``eps = 1e-30`` (PyTorch requires
eps > 0): BatchNorm's eps and running averages are the only things that break exact scale
invariance, and the two runs' weight norms drift apart by α^(−t), so with the default eps
(1e-5) the outputs would differ by ~eps/Var. With these choices the runs agree to rounding
error amplified by the training dynamics; ``equivalent`` is True when the largest relative
output difference stays ≤ 1e-4.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.data import load_mnist5k
from scaleinv_kernels.experiments.common import RunContext, figure, save_figure
from scaleinv_kernels.optim import FusedSGDWD
from scaleinv_kernels.scale_invariance import freeze_last_layer, normalized_cnn
from scaleinv_kernels.theory import explr_schedule

NAME = "explr"
USES_DATA = True
TOLERANCE = 1e-4
_BASE = dict(lr=0.1, momentum=0.9, weight_decay=5e-3, batch_size=128, test_batch=256,
             bn_eps=1e-30)
PRESETS = {
    "smoke": {**_BASE, "model": "mlp", "steps": 60, "batch_size": 64},
    "quick": {**_BASE, "model": "cnn", "steps": 200},
    "full": {**_BASE, "model": "cnn", "steps": 2000},
}


def exact_batchnorm(model: nn.Module, eps: float) -> nn.Module:
    """Make every BatchNorm of ``model`` use batch statistics in train and eval mode
    (no running averages) with the given ``eps``; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def build_model(kind: str) -> nn.Module:
    """``cnn``: :func:`normalized_cnn`; ``mlp``: Flatten → (Linear no bias → BN(affine=False)
    → ReLU) × 2 → Linear frozen at init."""
    if kind == "cnn":
        return normalized_cnn()
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32, bias=False),
                              nn.BatchNorm1d(32, affine=False), nn.ReLU(),
                              nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, affine=False),
                              nn.ReLU(), nn.Linear(32, 10))
        freeze_last_layer(model)
        return model
    raise ValueError(f"explr: model must be 'cnn' or 'mlp', got {kind!r}")


def run(ctx: RunContext) -> dict:
    c = ctx.config
    if ctx.data != "mnist5k":
        raise ValueError(f"explr: only --data mnist5k is supported, got {ctx.data!r}")
    dtype = torch.float64
    x_train, y_train, x_test, _ = load_mnist5k(ctx.device)
    x_train, x_test = x_train.to(dtype), x_test[:c["test_batch"]].to(dtype)
    torch.manual_seed(ctx.seed)
    net_wd = exact_batchnorm(build_model(c["model"]), c["bn_eps"]).to(ctx.device, dtype).train()
    net_exp = copy.deepcopy(net_wd)
    names = [n for n, p in net_wd.named_parameters() if p.requires_grad]
    params_wd = [p for p in net_wd.parameters() if p.requires_grad]
    params_exp = [p for p in net_exp.parameters() if p.requires_grad]

    sched = explr_schedule(c["lr"], c["weight_decay"], c["momentum"], c["steps"])
    opt_wd = FusedSGDWD(list(zip(names, params_wd)), lr=c["lr"], momentum=c["momentum"],
                        weight_decay=c["weight_decay"])
    opt_exp = torch.optim.SGD(params_exp, lr=float(sched.lrs[0]) if c["steps"] else c["lr"],
                              momentum=c["momentum"], weight_decay=0.0)
    if c["momentum"] > 0:  # the theorem's initial condition w̃₋₁ = α·w₋₁, as a buffer
        for p in params_exp:
            opt_exp.state[p]["momentum_buffer"] = sched.initial_momentum_buffer(p)

    gen = torch.Generator().manual_seed(ctx.seed)
    per_epoch = len(x_train) // c["batch_size"]
    perm = torch.randperm(len(x_train), generator=gen)
    diffs, ratios = [], []
    for t in ctx.progress_bar(range(c["steps"]), desc="explr"):
        if t % per_epoch == 0 and t:
            perm = torch.randperm(len(x_train), generator=gen)
        b = t % per_epoch
        idx = perm[b * c["batch_size"]:(b + 1) * c["batch_size"]].to(ctx.device)
        for net, opt in ((net_wd, opt_wd), (net_exp, opt_exp)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
        opt_exp.param_groups[0]["lr"] = float(sched.lrs[t])
        opt_wd.step()
        opt_exp.step()
        with torch.no_grad():
            out_wd, out_exp = net_wd(x_test), net_exp(x_test)
            diffs.append(float((out_exp - out_wd).norm() / out_wd.norm()))
            ratios.append([float(q.norm() / p.norm()) for p, q in zip(params_wd, params_exp)])
    ratio = np.asarray(ratios).reshape(len(ratios), len(names))
    predicted = sched.weight_scale[1:].numpy()
    ratio_err = (np.abs(ratio / predicted[:, None] - 1).max(axis=0) if len(ratios)
                 else np.zeros(len(names)))
    max_diff = max(diffs) if diffs else 0.0
    return {
        "steps": list(range(1, c["steps"] + 1)),
        "alpha": sched.alpha,
        "explr_lrs": sched.lrs,
        "initial_buffer_scale": sched.initial_buffer_scale,
        "layers": names,
        "output_rel_diff": diffs,
        "max_output_rel_diff": max_diff,
        "weight_ratio": {n: ratio[:, k].tolist() for k, n in enumerate(names)},
        "predicted_ratio": predicted,
        "max_weight_ratio_rel_error": {n: float(e) for n, e in zip(names, ratio_err)},
        "tolerance": TOLERANCE,
        "equivalent": bool(max_diff <= TOLERANCE),
        "dtype": "float64",
        "backend": opt_wd.backend,
    }


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    steps = result["steps"]
    fig, ax = figure(1, 2)
    ax[0, 0].semilogy(steps, [max(d, 1e-18) for d in result["output_rel_diff"]], lw=1)
    ax[0, 0].axhline(result["tolerance"], color="k", ls="--", lw=1, label="tolerance 1e-4")
    ax[0, 0].set(xlabel="step", ylabel="‖f_ExpLR − f_WD‖ / ‖f_WD‖",
                 title="outputs on a fixed test batch")
    for name, r in result["weight_ratio"].items():
        ax[0, 1].semilogy(steps, r, lw=2, alpha=0.6, label=name)
    ax[0, 1].semilogy(steps, result["predicted_ratio"], "k--", lw=1, label="α^(−t)")
    ax[0, 1].set(xlabel="step", ylabel="‖w̃_t‖ / ‖w_t‖", title="weight norm ratio")
    for a in ax[0]:
        a.legend(fontsize=7)
        a.grid(alpha=0.3, which="both")
    save_figure(fig, path, f"ExpLR ≡ WD (Li & Arora 2020): η={c['lr']}, μ={c['momentum']}, "
                           f"λ={c['weight_decay']}, α={result['alpha']:.6f}; max output "
                           f"difference {result['max_output_rel_diff']:.1e}")
