"""fig4-equilibrium: after O(1/λe) steps the distribution of trained nets in function
space forgets the schedule's past; only the intrinsic LR λe = η·λ matters.

Claim (paper, Fig. 4). Take several (lr, wd) schedules with different histories whose
intrinsic LRs λe = lr·wd become equal at an "equalization" epoch. Train many nets per
schedule, each with its own SGD noise (data order). Per test point, the members' predicted
labels form a distribution. At the equalization epoch the schedules' distributions differ;
O(1/λe) steps later they are the same distribution — the equilibrium of λe.

How it is tested (:mod:`scaleinv_kernels.ensemble.hypothesis`). Per pair of schedules
and per evaluation from the equalization epoch on:

* a **permutation test** of "the two ensembles are draws from one distribution" with the
  ℓ1 statistic (mean over points of Σ_k |p_k − q_k|), R re-splits of the pooled members;
  the p-values of all pairs × evaluations form ONE family, Holm-corrected;
* the **debiased effect size** D² = mean_n Σ_k (p_nk − q_nk)² (unbiased: 0 in expectation
  for equal distributions whatever the ensemble size) with a 95 % member-bootstrap CI,
  against the **equivalence margin** 0.02²·10/9 = 4.4e-4: the smallest D² of any pair of
  label distributions whose mean accuracies (or the mean share of any one label) differ by
  2 points (:func:`~scaleinv_kernels.ensemble.hypothesis.equivalence_margin`), so "below
  the margin" excludes every shift that moves accuracy by 2 points or more.

Verdicts (α = 0.05): **separated at equalization** — Holm p < α for every main pair;
**equal at the end** — for every main pair, the *uncorrected* p ≥ α (stricter than the
corrected one for a claim of equality) AND the D² CI upper bound < margin. Two controls
must behave, else the run says nothing:

* **negative control** ``const_4x``: the ``const`` history, then a 4× larger λe: it
  ends at ANOTHER equilibrium, so const vs const_4x must still be separated at the end
  (Holm p < α) — the test can say "not equal";
* **positive control** ``const_b``: a second ``const`` ensemble (other members, so other
  data orders and, with ``init="independent"``, other initializations): const vs const_b
  must not be separated at any evaluation (Holm p ≥ α) — the test does not see
  differences where there are none.

``claim_supported`` = both controls behave AND separated at equalization AND equal at
the end. The ratio ℓ1 / noise floor stays as a descriptive curve, with the floor per pair
(the mean of the two schedules' own :func:`noise_floor` at this ensemble size).

Predictions use BatchNorm statistics **recomputed on training data for every member**
(:func:`recalibrated_predict`): at λe = 4e-3 the weights rotate by ≈ 0.09 rad per step,
and the running averages (momentum 0.1, ≈ 10 steps) describe a mix of past weights; that
adds per-member noise that pushes every distance towards the floor, i.e. towards the
claim.

Setup (ours; the paper's appendix is not public):

* quick (2-core CPU): MNIST-5k (4000 train / 1000 test), a two-hidden-layer BatchNorm
  MLP (784 → 128 → 128, ``Linear(bias=False)`` → ``BatchNorm1d(affine=False)`` → ReLU,
  frozen random ``Linear(128 → 10)``: scale-invariant in every trainable tensor), batch
  128, plain SGD (no momentum), 128 members per schedule (5 schedules: 640 nets in one
  Ensemble; with 64 the positive control's D² interval stayed above the margin, so the
  equivalence arm could not succeed even for two draws of one distribution), 20 epochs,
  equalization at epoch 8, λe = 4e-3 afterwards (≈ 250 steps = 8 epochs per 1/λe: the
  12 epochs after equalization are 1.5/λe), evaluations every 2
  epochs, R = 2000 re-splits, B = 1000 bootstrap replicates, BatchNorm statistics from
  2048 training images. ``init="independent"``: every member (of every schedule) starts
  from its own initialization. Why: the claim is about the distribution of trained nets,
  initialization included; with one shared initialization every ensemble is conditional
  on that one draw, and "forgets the schedule" would not show that the init is forgotten
  too. ``--init shared`` gives the shared-initialization variant. The schedules, (lr, wd)
  before → after equalization:

  - ``const``: (0.1, 0.04) → (0.1, 0.04) throughout;
  - ``hot``: (0.8, 0.04) → (0.1, 0.04): an 8× larger λe first, then a step decay;
  - ``cold``: (0.003, 0.01) → (0.4, 0.01): a 130× smaller λe first (slow, nearly
    noise-free descent from the initialization), then the same λe as the others with a
    different split between lr and wd;
  - ``const_4x`` (negative control): (0.1, 0.04) → (0.4, 0.04), λe = 1.6e-2 at the end;
  - ``const_b`` (positive control): as ``const``.

* full (GPU): the 4-layer normalized CNN, 500 members per schedule, 120 epochs,
  equalization at epoch 40, same λe ratios, BatchNorm statistics from the whole training
  set.

All members of all schedules are ONE :class:`~scaleinv_kernels.ensemble.Ensemble`
(5·M members) trained by one :class:`~scaleinv_kernels.ensemble.EnsembleTrainer` with
per-member ``lr``/``weight_decay`` tensors in :class:`~scaleinv_kernels.FusedSGDWD`.

Several processes (``torchrun --nproc_per_node=N -m scaleinv_kernels.experiments
fig4-equilibrium ...``): the S·M global members are split into contiguous blocks over the
ranks (:func:`~scaleinv_kernels.ensemble.distributed.member_range`; global member g
follows schedule g // M); each rank trains its block as an Ensemble with
``member_offset`` = the block's start and the per-member lr/wd of ITS members. Per
epoch the members' training losses and effective LRs, per evaluation their predictions,
are gathered; rank 0 computes every statistic and writes the checkpoints, which hold
every member, so a run can resume with any number of processes. On the CPU the result is
bitwise that of one process (every member's computation is independent of how many
members share its process).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scaleinv_kernels.data import load_dataset
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.distributed import (
    gather_members,
    gather_trainer_state,
    member_range,
    slice_trainer_state,
)
from scaleinv_kernels.ensemble.function_space import (
    l1_distance,
    label_distribution,
    noise_floor,
    predict,
)
from scaleinv_kernels.ensemble.hypothesis import (
    d2_bootstrap,
    equivalence_margin,
    holm,
    permutation_test,
)
from scaleinv_kernels.ensemble.layers import MemberBatchNorm
from scaleinv_kernels.experiments.common import (
    RunContext,
    cpu_rng_state,
    figure,
    save_figure,
    set_rng_state,
)
from scaleinv_kernels.experiments.training import normalized_mlp
from scaleinv_kernels.optim import FusedSGDWD
from scaleinv_kernels.scale_invariance import normalized_cnn

NAME = "fig4-equilibrium"
USES_DATA = True
DISTRIBUTED = True  # members may be split over torchrun processes

# (lr, wd) before and after the equalization epoch, per schedule
_SCHEDULES = {
    "const": ((0.1, 0.04), (0.1, 0.04)),
    "hot": ((0.8, 0.04), (0.1, 0.04)),
    "cold": ((0.003, 0.01), (0.4, 0.01)),
    "const_4x": ((0.1, 0.04), (0.4, 0.04)),  # negative control: another final λe
    "const_b": ((0.1, 0.04), (0.1, 0.04)),   # positive control: const again
}
#: the pairs whose equality the claim is about, and the two controls
MAIN_PAIRS = (("const", "hot"), ("const", "cold"), ("hot", "cold"))
NEGATIVE_CONTROL = ("const", "const_4x")
POSITIVE_CONTROL = ("const", "const_b")
ALPHA = 0.05

_STATS = dict(n_permutations=2000, n_bootstrap=1000, accuracy_gap=0.02)
PRESETS = {
    "smoke": dict(model="mlp", hidden=32, members=6, epochs=4, equalize_epoch=2,
                  eval_every=2, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                  checkpoint_every=2, train_subset=1000, chunk_size=None,
                  init="independent", bn_points=512, n_permutations=500,
                  n_bootstrap=200, accuracy_gap=0.02),
    "quick": dict(model="mlp", hidden=128, members=128, epochs=20, equalize_epoch=8,
                  eval_every=2, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                  checkpoint_every=4, train_subset=None, chunk_size=None,
                  init="independent", bn_points=2048, **_STATS),
    "full": dict(model="cnn", hidden=None, members=500, epochs=120, equalize_epoch=40,
                 eval_every=5, batch_size=128, momentum=0.0, schedules=_SCHEDULES,
                 checkpoint_every=5, train_subset=None, chunk_size=100,
                 init="independent", bn_points=None, **_STATS),
}


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


def _batchnorms(ens: Ensemble) -> list[MemberBatchNorm]:
    return [m for m in ens.modules() if isinstance(m, MemberBatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm_(ens: Ensemble, x_train: Tensor, batch_size: int = 128) -> int:
    """Set every member's BatchNorm running statistics to their average over the batches
    of ``batch_size`` images of ``x_train`` (the last, smaller one dropped): per batch the
    mean and the unbiased variance, as ``torch.optim.swa_utils.update_bn`` — the
    statistics of each member's CURRENT weights. All members see the same batches, in one
    shared forward pass per batch; ``momentum=1`` makes each pass write its batch
    statistics, summed here in float64 (this also works for the fused norm → ReLU layers,
    which have no cumulative mode). Returns the number of batches; ``momentum`` and the
    train/eval mode are restored, ``num_batches_tracked`` advances by that number."""
    n_batches = x_train.shape[0] // batch_size
    if n_batches < 1:
        raise ValueError(f"recalibrate_batchnorm_: {x_train.shape[0]} training images, fewer "
                         f"than one batch of {batch_size}")
    norms = _batchnorms(ens)
    momenta = [m.momentum for m in norms]
    was_training = ens.training
    device = next(ens.parameters()).device
    sums = [(torch.zeros_like(m.running_mean, dtype=torch.float64),
             torch.zeros_like(m.running_var, dtype=torch.float64)) for m in norms]
    try:
        for m in norms:
            m.momentum = 1.0
        ens.train()
        for i in range(n_batches):
            ens.forward_shared(x_train[i * batch_size:(i + 1) * batch_size].to(device))
            for m, (s_mean, s_var) in zip(norms, sums):
                s_mean += m.running_mean
                s_var += m.running_var
        for m, (s_mean, s_var) in zip(norms, sums):
            m.running_mean.copy_(s_mean / n_batches)
            m.running_var.copy_(s_var / n_batches)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        ens.train(was_training)
    return n_batches


@torch.no_grad()
def recalibrated_predict(ens: Ensemble, x_train: Tensor, x_test: Tensor, *,
                         batch_size: int = 128, test_batch: int = 1000) -> Tensor:
    """int64 [M, N]: every member's labels on ``x_test`` in eval mode, with its BatchNorm
    statistics first recomputed on ``x_train`` (:func:`recalibrate_batchnorm_`). The
    ensemble's running statistics (and dropout pass counts) are restored afterwards, so
    training continues exactly as without the call."""
    norms = _batchnorms(ens)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    random_step = getattr(ens, "random_step", None)
    saved_steps = random_step.clone() if isinstance(random_step, Tensor) else None
    try:
        recalibrate_batchnorm_(ens, x_train, batch_size)
        return predict(ens, x_test, batch_size=test_batch)
    finally:
        for m, (rm, rv, nbt) in zip(norms, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.num_batches_tracked.copy_(nbt)
        if saved_steps is not None:
            random_step.copy_(saved_steps)


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def tested_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The main pairs and the two controls, among the schedules present."""
    pairs = [p for p in (*MAIN_PAIRS, NEGATIVE_CONTROL, POSITIVE_CONTROL)
             if p[0] in names and p[1] in names]
    return list(dict.fromkeys(pairs))


def compare(parts: dict[str, Tensor], pairs: list[tuple[str, str]], num_classes: int, *,
            n_permutations: int, n_bootstrap: int, seed: int) -> dict[str, dict]:
    """Per pair: permutation p-value, null mean ℓ1, D² with its 95 % bootstrap CI (seeded
    from ``seed`` and the pair's index, so a resumed run gives the same numbers)."""
    out = {}
    for j, (a, b) in enumerate(pairs):
        pt = permutation_test(parts[a], parts[b], num_classes, n_permutations=n_permutations,
                              generator=seed * 7919 + 2 * j)
        bs = d2_bootstrap(parts[a], parts[b], num_classes, n_bootstrap=n_bootstrap,
                          generator=seed * 7919 + 2 * j + 1)
        out[pair_key(a, b)] = {"p": pt.p_value, "l1": pt.statistic,
                               "null_mean_l1": pt.null_mean, "d2": bs.estimate,
                               "d2_low": bs.low, "d2_high": bs.high}
    return out


def verdicts(tests: dict[str, dict[str, list]], eval_epochs: list[int], equalize_epoch: int,
             margin: float) -> dict:
    """Holm over every pair × tested evaluation, then the verdicts of the docstring."""
    keys = list(tests)
    p = np.array([tests[k]["p"] for k in keys])  # [pairs, evaluations]
    p_holm = holm(p)
    for k, row in zip(keys, p_holm):
        tests[k]["p_holm"] = row.tolist()
    tested = [e for e in eval_epochs if e >= equalize_epoch]
    eq, end = tested.index(equalize_epoch), len(tested) - 1

    def at(pair, field, i):
        return tests[pair_key(*pair)][field][i]

    main = [p for p in MAIN_PAIRS if pair_key(*p) in tests]
    separated = {pair_key(*p): at(p, "p_holm", eq) < ALPHA for p in main}
    equal = {pair_key(*p): bool(at(p, "p", end) >= ALPHA and at(p, "d2_high", end) < margin)
             for p in main}
    out = {"alpha": ALPHA, "equivalence_margin": margin, "tested_epochs": tested,
           "separated_at_equalize_per_pair": separated,
           "equal_at_end_per_pair": equal,
           "separated_at_equalize": bool(main) and all(separated.values()),
           "equilibrium_at_end": bool(main) and all(equal.values())}
    neg, pos = pair_key(*NEGATIVE_CONTROL), pair_key(*POSITIVE_CONTROL)
    out["negative_control_separated_at_end"] = (
        bool(tests[neg]["p_holm"][end] < ALPHA) if neg in tests else None)
    out["positive_control_never_separated"] = (
        bool(min(tests[pos]["p_holm"]) >= ALPHA) if pos in tests else None)
    out["positive_control_equal_at_end"] = (
        bool(tests[pos]["p"][end] >= ALPHA and tests[pos]["d2_high"][end] < margin)
        if pos in tests else None)
    out["controls_ok"] = bool(out["negative_control_separated_at_end"]
                              and out["positive_control_never_separated"])
    out["claim_supported"] = bool(out["controls_ok"] and out["separated_at_equalize"]
                                  and out["equilibrium_at_end"])
    return out


def run(ctx: RunContext) -> dict | None:
    """The result on the main rank; None on the other ranks under torchrun."""
    c = ctx.config
    names = list(c["schedules"])
    m, s = c["members"], len(names)
    if m < 2:
        raise ValueError(f"{NAME}: members must be >= 2 per schedule (D² needs two), got {m}")
    if c["init"] not in ("shared", "independent"):
        raise ValueError(f"{NAME}: init must be 'shared' or 'independent', got {c['init']!r}")
    info = ctx.dist
    mine = member_range(s * m, info.rank, info.world_size)  # this rank's global members
    X, Y, Xt, Yt = load_dataset(ctx.data, ctx.data_root, ctx.device)
    if c["train_subset"]:
        X, Y = X[:c["train_subset"]], Y[:c["train_subset"]]
    num_classes = int(max(int(Y.max()), int(Yt.max()))) + 1
    X_bn = X if c["bn_points"] is None else X[:c["bn_points"]]
    in_ch, hw = X.shape[1], X.shape[2]
    if c["model"] == "mlp":
        def factory():
            return normalized_mlp(in_ch * hw * X.shape[3], c["hidden"], num_classes)
    else:
        def factory():
            return normalized_cnn(in_channels=in_ch)
    ens = Ensemble(factory, len(mine), init=c["init"], seed=ctx.seed,
                   member_offset=mine.start).to(ctx.device)
    named = [(n, p) for n, p in ens.named_parameters() if p.requires_grad]
    opt = FusedSGDWD(named, lr=0.0, momentum=c["momentum"], weight_decay=0.0)
    trainer = EnsembleTrainer(ens, opt, (X, Y), c["batch_size"], seed=ctx.seed,
                              chunk_size=c["chunk_size"], progress=False,
                              member_offset=mine.start)
    all_lr_wd = schedule_tensors(c, ctx.device)
    pairs = tested_pairs(names)

    def lr_wd(epoch: int):
        lr, wd = all_lr_wd(epoch)
        return lr[mine.start:mine.stop], wd[mine.start:mine.stop]

    curves = {"eval_epochs": [],
              "l1": {pair_key(a, b): [] for a, b in itertools.combinations(names, 2)},
              "noise_floor": {pair_key(a, b): [] for a, b in pairs},
              "tests": {pair_key(a, b): {f: [] for f in ("p", "l1", "null_mean_l1", "d2",
                                                         "d2_low", "d2_high")}
                        for a, b in pairs},
              "test_accuracy": {n: [] for n in names},
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
        preds = gather_members(recalibrated_predict(ens, X_bn, Xt,
                                                    batch_size=c["batch_size"]), info)
        if not info.is_main:
            return
        parts = {n: preds[i * m:(i + 1) * m] for i, n in enumerate(names)}
        dist = {n: label_distribution(p, num_classes) for n, p in parts.items()}
        curves["eval_epochs"].append(epoch)
        for a, b in itertools.combinations(names, 2):
            curves["l1"][pair_key(a, b)].append(float(l1_distance(dist[a], dist[b])))
        for a, b in pairs:
            floor = [noise_floor(parts[n], size=m, generator=epoch) for n in (a, b)]
            curves["noise_floor"][pair_key(a, b)].append(sum(floor) / 2)
        for n, p in parts.items():
            curves["test_accuracy"][n].append(float((p == Yt.cpu()).double().mean()))
        if epoch >= c["equalize_epoch"]:
            res = compare(parts, pairs, num_classes, n_permutations=c["n_permutations"],
                          n_bootstrap=c["n_bootstrap"], seed=ctx.seed * 1000 + epoch)
            for key, values in res.items():
                for f, v in values.items():
                    curves["tests"][key][f].append(v)

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
    margin = equivalence_margin(c["accuracy_gap"], num_classes)
    result_verdicts = verdicts(curves["tests"], curves["eval_epochs"], c["equalize_epoch"],
                               margin)
    ep = curves["eval_epochs"]
    eq = ep.index(c["equalize_epoch"])
    floors = curves["noise_floor"]
    return {
        **curves,
        **result_verdicts,
        "equalize_epoch": c["equalize_epoch"],
        "num_classes": num_classes,
        "schedules": {n: {"before": c["schedules"][n][0], "after": c["schedules"][n][1],
                          "intrinsic_lr_before": c["schedules"][n][0][0] * c["schedules"][n][0][1],
                          "intrinsic_lr_after": c["schedules"][n][1][0] * c["schedules"][n][1][1]}
                      for n in names},
        "ratio_at_equalize": {k: curves["l1"][k][eq] / floors[k][eq] for k in floors},
        "ratio_at_end": {k: curves["l1"][k][-1] / floors[k][-1] for k in floors},
    }


def plot(result: dict, path: Path) -> None:
    c = result["config"]
    fig, ax = figure(2, 3)
    ep = result["eval_epochs"]
    tested = result["tested_epochs"]
    colors = {k: f"C{i}" for i, k in enumerate(result["tests"])}

    def label(k):
        role = {"|".join(NEGATIVE_CONTROL): " (neg. control)",
                "|".join(POSITIVE_CONTROL): " (pos. control)"}.get(k, "")
        return k.replace("|", " vs ") + role

    for k, floor in result["noise_floor"].items():
        ratio = np.array(result["l1"][k]) / np.array(floor)
        ax[0, 0].plot(ep, ratio, marker="o", ms=3, color=colors[k], label=label(k))
    ax[0, 0].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[0, 0].set(xlabel="epoch", ylabel="ℓ1 / noise floor (per pair)", yscale="log",
                 title="descriptive: distance over its floor")
    for k, t in result["tests"].items():
        ax[0, 1].semilogy(tested, t["p_holm"], marker="o", ms=3, color=colors[k],
                          label=label(k))
    ax[0, 1].axhline(result["alpha"], color="k", ls="--", lw=0.8, label="α = 0.05")
    ax[0, 1].set(xlabel="epoch", ylabel="permutation p (Holm)",
                 title=f"separated? (R = {c['n_permutations']})")
    margin = result["equivalence_margin"]
    for k, t in result["tests"].items():
        d2 = np.array(t["d2"])
        err = np.stack([d2 - np.array(t["d2_low"]), np.array(t["d2_high"]) - d2])
        ax[0, 2].errorbar(tested, d2, yerr=err, marker="o", ms=3, capsize=2, color=colors[k],
                          label=label(k))
    ax[0, 2].axhline(margin, color="k", ls="--", lw=0.8, label=f"margin {margin:.1e}")
    ax[0, 2].axhline(0.0, color="grey", lw=0.5)
    ax[0, 2].set_yscale("symlog", linthresh=margin / 4)
    ax[0, 2].set(xlabel="epoch", ylabel="debiased D² (95 % CI)", title="effect size")
    for n, values in result["test_accuracy"].items():
        ax[1, 0].plot(ep, values, marker="o", ms=3, label=n)
    ax[1, 0].set(xlabel="epoch", ylabel="test accuracy (member mean, BN recomputed)",
                 title="accuracy")
    for n, layers in result["effective_lr"].items():
        for k, (layer, values) in enumerate(layers.items()):
            ax[1, 1].semilogy(range(1, len(values) + 1), values, lw=1,
                              ls=("-", "--", ":")[k % 3], label=f"{n} {layer}")
    ax[1, 1].set(xlabel="epoch", ylabel="η/‖w‖² (member mean)", title="effective LR")
    for a in (*ax[0], ax[1, 0], ax[1, 1]):
        a.axvline(result["equalize_epoch"], color="grey", lw=0.8)
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    # the verdict table
    ax[1, 2].axis("off")
    end = -1
    lines = [f"at epoch {tested[end]} (end) / {result['equalize_epoch']} (equalization):"]
    for k, t in result["tests"].items():
        i0 = tested.index(result["equalize_epoch"])
        lines.append(f"{k}: p_holm {t['p_holm'][i0]:.2g} / {t['p_holm'][end]:.2g}, "
                     f"p {t['p'][end]:.2g}")
        lines.append(f"   D² end {t['d2'][end]:.2e} [{t['d2_low'][end]:.1e}, "
                     f"{t['d2_high'][end]:.1e}]")
    lines += ["", f"separated at equalization: {result['separated_at_equalize']}",
              f"equal at the end: {result['equilibrium_at_end']}",
              f"neg. control separated at end: {result['negative_control_separated_at_end']}",
              f"pos. control never separated: {result['positive_control_never_separated']}",
              f"claim supported: {result['claim_supported']}"]
    ax[1, 2].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=7,
                  family="monospace", transform=ax[1, 2].transAxes)
    save_figure(fig, path, f"{c['members']} members per schedule ({c['init']} init), "
                           f"{c['model'].upper()} on {result['data']}: λe equal from epoch "
                           f"{result['equalize_epoch']}")
