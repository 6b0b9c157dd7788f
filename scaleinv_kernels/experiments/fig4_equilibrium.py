"""fig4-equilibrium: after O(1/λe) steps the distribution of trained nets in function
space forgets the schedule's past; only the intrinsic LR λe = η·λ matters.

Claim (paper, Fig. 4). Take several (lr, wd) schedules with different histories whose
intrinsic LRs λe = lr·wd become equal at an "equalization" epoch. Train many nets per
schedule from the SAME initialization, each with its own SGD noise (data order). Per test
point, the members' predicted labels form a distribution; between two schedules compare
these distributions with the ℓ1 distance (mean over points of Σ_k |p_k − q_k|). At the
equalization epoch the schedules are far apart; O(1/λe) steps later the ℓ1 has fallen to
the noise floor — the ℓ1 two ensembles of this size show when drawn from ONE
distribution — i.e. the schedules have reached the same equilibrium.

Setup (ours; the paper's appendix is not public):

* quick (2-core CPU, minutes): MNIST-5k (4000 train / 1000 test), a two-hidden-layer
  BatchNorm MLP (784 → 128 → 128, ``Linear(bias=False)`` → ``BatchNorm1d(affine=False)``
  → ReLU, frozen random ``Linear(128 → 10)``: scale-invariant in every trainable
  tensor), batch 128, plain SGD (no momentum), 32 members per schedule, 30 epochs,
  equalization at epoch 10, λe = 4e-3 afterwards (≈ 250 steps = 8 epochs per 1/λe).
  The three schedules (lr, wd) before → after equalization:

  - ``const``: (0.1, 0.04) → (0.1, 0.04) throughout;
  - ``hot``: (0.8, 0.04) → (0.1, 0.04): an 8× larger λe first, then a step decay;
  - ``cold``: (0.003, 0.01) → (0.4, 0.01): a 130× smaller λe first (slow, nearly
    noise-free descent from the initialization), then the same λe as the others with a
    different split between lr and wd.

  Chosen by measurement: with milder ``cold`` phases, (0.02, 0.02) and (0.01, 0.01),
  the const/cold distance at equalization was only 1.9× the noise floor (the MLP learns
  well at small LR too); with (0.003, 0.01) it is 3.1×. In both runs every pair was
  within 1.3× the floor 2 epochs after equalization.

* full (GPU): the 4-layer normalized CNN, 500 members per schedule, 120 epochs,
  equalization at epoch 40, same λe ratios.

All members of all schedules are ONE :class:`~scaleinv_kernels.ensemble.Ensemble`
(3·M members) trained by one :class:`~scaleinv_kernels.ensemble.EnsembleTrainer` with
per-member ``lr``/``weight_decay`` tensors in :class:`~scaleinv_kernels.FusedSGDWD`.
Predictions use BatchNorm running statistics (eval mode). The noise floor at each
evaluation is :func:`~scaleinv_kernels.ensemble.metrics.noise_floor` (split halves,
rescaled to M members) averaged over the schedules.

Several processes (``torchrun --nproc_per_node=N -m scaleinv_kernels.experiments
fig4-equilibrium ...``): the S·M global members are split into contiguous blocks over the
ranks (:func:`~scaleinv_kernels.ensemble.distributed.member_range`; global member g
follows schedule g // M); each rank trains its block as an Ensemble with
``member_offset`` = the block's start and the per-member lr/wd of ITS members. Per
epoch the members' training losses and effective LRs, per evaluation their predictions,
are gathered; rank 0 computes every metric and writes the checkpoints, which hold every
member, so a run can resume with any number of processes. On the CPU the result is
bitwise that of one process (every member's computation is independent of how many
members share its process).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from scaleinv_kernels.data import load_dataset
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.distributed import (
    gather_members,
    gather_trainer_state,
    member_range,
    slice_trainer_state,
)
from scaleinv_kernels.ensemble.metrics import (
    l1_distance,
    label_distribution,
    noise_floor,
    predict,
)
from scaleinv_kernels.experiments.common import (
    RunContext,
    cpu_rng_state,
    figure,
    save_figure,
    set_rng_state,
)
from scaleinv_kernels.optim import FusedSGDWD
from scaleinv_kernels.scale_invariance import freeze_last_layer, normalized_cnn

NAME = "fig4-equilibrium"
USES_DATA = True
DISTRIBUTED = True  # members may be split over torchrun processes

# (lr, wd) before and after the equalization epoch, per schedule
_SCHEDULES = {
    "const": ((0.1, 0.04), (0.1, 0.04)),
    "hot": ((0.8, 0.04), (0.1, 0.04)),
    "cold": ((0.003, 0.01), (0.4, 0.01)),
}
PRESETS = {
    "smoke": dict(model="mlp", hidden=32, members=8, epochs=6, equalize_epoch=2,
                  eval_every=2, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                  checkpoint_every=2, train_subset=1000, chunk_size=None),
    "quick": dict(model="mlp", hidden=128, members=32, epochs=30, equalize_epoch=10,
                  eval_every=2, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                  checkpoint_every=5, train_subset=None, chunk_size=None),
    "full": dict(model="cnn", hidden=None, members=500, epochs=120, equalize_epoch=40,
                 eval_every=5, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                 checkpoint_every=5, train_subset=None, chunk_size=100),
}


def normalized_mlp(d_in: int = 784, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """Two hidden BN layers, scale-invariant in both trainable weights (last layer fixed)."""
    model = nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(d_in, hidden, bias=False), bn1=nn.BatchNorm1d(hidden, affine=False),
        relu1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden, bias=False), bn2=nn.BatchNorm1d(hidden, affine=False),
        relu2=nn.ReLU(),
        out=nn.Linear(hidden, num_classes)))
    freeze_last_layer(model)
    return model


def schedule_tensors(config: dict, device: torch.device):
    """epoch → (lr [S·M], wd [S·M]) float64 tensors, members of schedule s at rows
    s·M … s·M+M−1."""
    m = config["members"]
    names = list(config["schedules"])

    def at(epoch: int):
        phase = 0 if epoch < config["equalize_epoch"] else 1
        lr = torch.tensor([config["schedules"][n][phase][0] for n in names], dtype=torch.float64)
        wd = torch.tensor([config["schedules"][n][phase][1] for n in names], dtype=torch.float64)
        return lr.repeat_interleave(m).to(device), wd.repeat_interleave(m).to(device)

    return at


def run(ctx: RunContext) -> dict | None:
    """The result on the main rank; None on the other ranks under torchrun."""
    c = ctx.config
    names = list(c["schedules"])
    m, s = c["members"], len(names)
    info = ctx.dist
    mine = member_range(s * m, info.rank, info.world_size)  # this rank's global members
    X, Y, Xt, Yt = load_dataset(ctx.data, ctx.data_root, ctx.device)
    if c["train_subset"]:
        X, Y = X[:c["train_subset"]], Y[:c["train_subset"]]
    in_ch, hw = X.shape[1], X.shape[2]
    if c["model"] == "mlp":
        def factory():
            return normalized_mlp(in_ch * hw * X.shape[3], c["hidden"])
    else:
        def factory():
            return normalized_cnn(in_channels=in_ch)
    # every member of every schedule starts from the same weights
    ens = Ensemble(factory, len(mine), init="shared", seed=ctx.seed,
                   member_offset=mine.start).to(ctx.device)
    named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=0.0, momentum=c["momentum"], weight_decay=0.0)
    trainer = EnsembleTrainer(ens, opt, (X, Y), c["batch_size"], seed=ctx.seed,
                              chunk_size=c["chunk_size"], progress=False,
                              member_offset=mine.start)
    all_lr_wd = schedule_tensors(c, ctx.device)

    def lr_wd(epoch: int):
        lr, wd = all_lr_wd(epoch)
        return lr[mine.start:mine.stop], wd[mine.start:mine.stop]

    curves = {"eval_epochs": [], "l1": {f"{a}|{b}": [] for a, b in
                                        itertools.combinations(names, 2)},
              "noise_floor": [], "test_accuracy": {n: [] for n in names},
              "effective_lr": {n: {} for n in names}, "train_loss": {n: [] for n in names}}
    state = ctx.restore()
    if state is not None:
        # the checkpoint holds every member (any world size wrote it): take ours
        trainer.load_state_dict(slice_trainer_state(state["trainer"], mine))
        curves = state["curves"]
        set_rng_state(state["rng"])
    if info.distributed:
        # a rank that saw no (or another) checkpoint would train other epochs and hang
        # the collectives: every rank must start from the same epoch
        starts = gather_members(torch.tensor([trainer.epoch]), info)
        if bool((starts != starts[0]).any()):
            raise RuntimeError(f"{NAME}: the ranks resume from different epochs "
                               f"{starts.tolist()}; with --resume every rank must see the "
                               f"same {ctx.checkpoint_path} (a shared file system)")

    def evaluate(epoch: int) -> None:
        preds = gather_members(predict(ens, Xt, batch_size=1000), info)  # [S·M, N]
        if not info.is_main:
            return
        parts = {n: preds[i * m:(i + 1) * m] for i, n in enumerate(names)}
        dist = {n: label_distribution(p, 10) for n, p in parts.items()}
        curves["eval_epochs"].append(epoch)
        for a, b in itertools.combinations(names, 2):
            curves["l1"][f"{a}|{b}"].append(float(l1_distance(dist[a], dist[b])))
        curves["noise_floor"].append(
            sum(noise_floor(p, size=m, generator=epoch) for p in parts.values()) / s)
        for n, p in parts.items():
            curves["test_accuracy"][n].append(float((p == Yt.cpu()).double().mean()))

    bar = ctx.progress_bar(range(trainer.epoch, c["epochs"]), desc=NAME, unit="epoch",
                           initial=trainer.epoch, total=c["epochs"])
    for epoch in bar:
        record = trainer.fit(1, schedule=lr_wd)[0]
        stats = opt.layer_stats()
        # one gather per epoch: column 0 the training loss, then the per-layer effective LR
        local = torch.cat([record["train_loss"].float().view(-1, 1),
                           stats.per_member("effective_lr").to(record["train_loss"].device)],
                          dim=1)
        both = gather_members(local, info)  # [S·M, 1 + layers]
        # contiguous, as in one process: a strided view could be reduced in another order
        loss, eff = both[:, 0].contiguous(), both[:, 1:].contiguous()
        if info.is_main:
            for i, n in enumerate(names):
                curves["train_loss"][n].append(float(loss[i * m:(i + 1) * m].mean()))
                layer_means = eff[i * m:(i + 1) * m].double().mean(0)
                for j, (pname, _) in enumerate(named):
                    curves["effective_lr"][n].setdefault(pname, []).append(
                        float(layer_means[j]))
        done = epoch + 1
        if done % c["eval_every"] == 0 or done == c["equalize_epoch"] or done == c["epochs"]:
            evaluate(done)
        if done % c["checkpoint_every"] == 0 and done < c["epochs"]:
            full = gather_trainer_state(trainer.state_dict(), info)  # every rank takes part
            ctx.checkpoint({"trainer": full, "curves": curves, "rng": cpu_rng_state()})
    if not info.is_main:
        return None
    eq = curves["eval_epochs"].index(c["equalize_epoch"])
    floors = curves["noise_floor"]
    pairs = list(curves["l1"])
    return {
        **curves,
        "equalize_epoch": c["equalize_epoch"],
        "schedules": {n: {"before": c["schedules"][n][0], "after": c["schedules"][n][1],
                          "intrinsic_lr_before": c["schedules"][n][0][0] * c["schedules"][n][0][1],
                          "intrinsic_lr_after": c["schedules"][n][1][0] * c["schedules"][n][1][1]}
                      for n in names},
        "ratio_at_equalize": {p: curves["l1"][p][eq] / floors[eq] for p in pairs},
        "ratio_at_end": {p: curves["l1"][p][-1] / floors[-1] for p in pairs},
        "separated_at_equalize": all(curves["l1"][p][eq] >= 2 * floors[eq] for p in pairs),
        "equilibrium_at_end": all(curves["l1"][p][-1] <= 1.5 * floors[-1] for p in pairs),
    }


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(1, 3)
    ep = result["eval_epochs"]
    for pair, values in result["l1"].items():
        ax[0, 0].plot(ep, values, marker="o", ms=3, label=pair.replace("|", " vs "))
    ax[0, 0].plot(ep, result["noise_floor"], "k--", label="noise floor")
    ax[0, 0].set(xlabel="epoch", ylabel="ℓ1 between label distributions",
                 title="function-space distance")
    for n, values in result["test_accuracy"].items():
        ax[0, 1].plot(ep, values, marker="o", ms=3, label=n)
    ax[0, 1].set(xlabel="epoch", ylabel="test accuracy (member mean)", title="accuracy")
    for n, layers in result["effective_lr"].items():
        for k, (layer, values) in enumerate(layers.items()):
            ax[0, 2].semilogy(range(1, len(values) + 1), values, lw=1,
                              ls=("-", "--", ":")[k % 3], label=f"{n} {layer}")
    ax[0, 2].set(xlabel="epoch", ylabel="η/‖w‖² (member mean)", title="effective LR")
    for a in ax[0]:
        a.axvline(result["equalize_epoch"], color="grey", lw=0.8)
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    save_figure(fig, path, f"{c['members']} members per schedule, {c['model'].upper()} on "
                           f"{result['data']}: λe equal from epoch {result['equalize_epoch']}")
