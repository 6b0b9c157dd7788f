"""Function-space Monte-Carlo statistics of an ensemble of independently trained nets.

The object of study is *the distribution of trained nets in function space*: per test point
n, the distribution p_n over predicted labels across many independent runs (the members of
an ensemble). After O(1/(ηλ)) steps of SGD + weight decay it reaches an equilibrium that no
longer depends on the schedule's past. To see that, compare the label distributions of two
ensembles (two schedules, or two moments of one schedule) with :func:`l1_distance`, and
judge the number against :func:`noise_floor`, the distance two ensembles of the same size
drawn from the *same* distribution show from sampling noise alone.

Typical use::

    preds = predict(ens, X_test)                      # int64 [M, N]
    p = label_distribution(preds, num_classes=10)     # float64 [N, K]
    d = l1_distance(p, label_distribution(preds_ref, 10))
    same = float(d) <= 1.5 * noise_floor(preds, size=(preds.shape[0], preds_ref.shape[0]))

Also here: member disagreement, SWA-style weight averaging with BatchNorm statistics
recomputed (:func:`average_weights`), and distances between weight snapshots.

An "ensemble" is duck-typed (no import of the Ensemble class, which would create a cycle):
:func:`predict` needs ``n_members``, ``forward_shared(x, members=slice)``, ``training``,
``train()``/``eval()`` and ``parameters()``; :func:`average_weights` needs ``n_members`` and
``member(i)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "average_state_dicts",
    "average_weights",
    "disagreement",
    "flatten_params",
    "l1_distance",
    "label_distribution",
    "noise_floor",
    "pairwise_disagreement",
    "pairwise_distances",
    "predict",
]

# Work tensors of more entries than this are processed in chunks (points or member rows),
# so that memory stays ~100 MiB whatever N, M or K.
_CHUNK_ELEMENTS = 1 << 23

# Buffer names that are statistics of the data, not weights (excluded from state-dict
# distances by default).
_BN_STAT_SUFFIXES = ("running_mean", "running_var")


# --------------------------------------------------------------------------------------
# validation helpers


def _is_int_tensor(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_positive_int(value: Any, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {value}")
    return value


def _check_preds(preds: Any, fn: str, name: str = "preds", ndim: int | tuple[int, ...] = 2,
                 num_classes: int | None = None) -> Tensor:
    """Predicted labels: an integer tensor of the given rank with values in [0, K)."""
    if not isinstance(preds, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of int labels, "
                        f"got {type(preds).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if preds.ndim not in ndims:
        want = " or ".join(("[M, N]" if d == 2 else "[N]") for d in ndims)
        raise ValueError(f"{fn}: {name} must be {want} (members × points), "
                         f"got shape {tuple(preds.shape)}")
    if not _is_int_tensor(preds):
        raise TypeError(f"{fn}: {name} must hold integer labels, got dtype {preds.dtype}")
    if preds.ndim == 2 and preds.shape[0] == 0:
        raise ValueError(f"{fn}: {name} has no members (shape {tuple(preds.shape)})")
    if preds.numel():
        lo, hi = int(preds.min()), int(preds.max())
        if lo < 0:
            raise ValueError(f"{fn}: {name} holds a negative label ({lo})")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{fn}: {name} holds label {hi}, outside [0, {num_classes})")
    return preds


# --------------------------------------------------------------------------------------
# predictions and label distributions


@torch.no_grad()
def predict(ens: Any, X: Tensor, *, batch_size: int = 1024,
            member_chunk: int | None = None) -> Tensor:
    """Argmax label of every member of ``ens`` for every point of ``X``.

    Args:
        ens: an ensemble (duck-typed): ``ens.n_members`` = M and
            ``ens.forward_shared(x, members=slice(a, b))`` mapping one batch x [B, ...] to
            logits [b − a, B, K] (any floating dtype).
        X: inputs [N, ...]; batches are moved to the device of ``ens``'s first parameter.
        batch_size: points per forward pass.
        member_chunk: members per forward pass; None = all M at once. Lower it when
            M × batch_size activations do not fit in memory.

    Returns:
        int64 tensor [M, N] on the CPU: ``out[i, n]`` = argmax_k of member i's logits at
        X[n] (ties go to the lowest k, as ``torch.argmax``).

    Runs in eval mode (BatchNorm running statistics, no dropout) under ``torch.no_grad``
    and puts ``ens`` back into the train/eval mode it had before, even on error.
    """
    fn = "predict"
    for attr in ("n_members", "forward_shared", "train", "eval"):
        if not hasattr(ens, attr):
            raise TypeError(f"{fn}: ens must be an ensemble with n_members and "
                            f"forward_shared(x, members=...); {type(ens).__name__} has no "
                            f"{attr!r}")
    if not isinstance(X, Tensor):
        raise TypeError(f"{fn}: X must be a torch.Tensor [N, ...], got {type(X).__name__}")
    if X.ndim < 1:
        raise ValueError(f"{fn}: X must be [N, ...] with a leading points dimension, got a "
                         "0-d tensor")
    _check_positive_int(batch_size, "batch_size", fn)
    M = _check_positive_int(ens.n_members, "ens.n_members", fn)
    chunk = M if member_chunk is None else _check_positive_int(member_chunk, "member_chunk", fn)
    first = next(iter(ens.parameters()), None) if hasattr(ens, "parameters") else None
    device = first.device if first is not None else X.device

    N = X.shape[0]
    out = torch.empty(M, N, dtype=torch.int64)
    was_training = bool(getattr(ens, "training", False))
    ens.eval()
    try:
        for n0 in range(0, N, batch_size):
            xb = X[n0:n0 + batch_size].to(device)
            b = xb.shape[0]
            for m0 in range(0, M, chunk):
                m1 = min(m0 + chunk, M)
                logits = ens.forward_shared(xb, members=slice(m0, m1))
                if not isinstance(logits, Tensor) or logits.ndim != 3 or \
                        tuple(logits.shape[:2]) != (m1 - m0, b):
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                    raise ValueError(f"{fn}: ens.forward_shared must return logits "
                                     f"[members, B, K] = [{m1 - m0}, {b}, K], got {got}")
                out[m0:m1, n0:n0 + b] = logits.argmax(dim=-1).cpu()
    finally:
        ens.train(was_training)
    return out


def label_distribution(preds: Tensor, num_classes: int) -> Tensor:
    """Per point, the share of members predicting each label.

    Args:
        preds: integer tensor [M, N] (members × points) with values in [0, num_classes).
        num_classes: K.

    Returns:
        float64 tensor [N, K] on ``preds``' device; ``out[n, k]`` = #{i: preds[i, n] = k} / M,
        so every row sums to 1 (up to rounding of the division).
    """
    fn = "label_distribution"
    K = _check_positive_int(num_classes, "num_classes", fn)
    preds = _check_preds(preds, fn, num_classes=K)
    M, N = preds.shape
    flat = (preds.long() + torch.arange(N, device=preds.device) * K).reshape(-1)
    counts = torch.bincount(flat, minlength=N * K).reshape(N, K)
    return counts.double() / M


def l1_distance(p: Tensor, q: Tensor, *, per_point: bool = False) -> Tensor:
    """ℓ1 distance between two label distributions, averaged over points.

    Args:
        p, q: floating tensors [N, K] of the same shape (rows: distributions over K labels,
            e.g. from :func:`label_distribution`), on the same device.
        per_point: return the [N] distances instead of their mean.

    Returns:
        0-d float64 tensor mean_n Σ_k |p[n, k] − q[n, k]|, in [0, 2] for distributions
        (2 = disjoint supports at every point); or float64 [N] with ``per_point=True``.
    """
    fn = "l1_distance"
    for name, t in (("p", p), ("q", q)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor [N, K], got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{fn}: {name} must be [N, K], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be floating (a distribution), got {t.dtype}; "
                            "turn labels into one with label_distribution(preds, K)")
    if p.shape != q.shape:
        raise ValueError(f"{fn}: p and q must have the same shape [N, K], got "
                         f"{tuple(p.shape)} and {tuple(q.shape)}")
    if p.device != q.device:
        raise ValueError(f"{fn}: p is on {p.device} but q is on {q.device}")
    if p.shape[0] == 0:
        raise ValueError(f"{fn}: no points (N = 0)")
    d = (p.double() - q.double()).abs().sum(dim=1)
    return d if per_point else d.mean()


# --------------------------------------------------------------------------------------
# noise floor


def _make_generator(generator: torch.Generator | int | None, fn: str) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"{fn}: generator must be a torch.Generator, an int seed or None, "
                        f"got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def _signed_l1(idx_chunks: list[Tensor], weights: Tensor, n_points: int) -> float:
    """mean_n Σ_k |Σ_i weights[i] · 1[label of member i at n = k]| for label indices
    pre-offset per chunk (``idx_chunks[c]`` = [M, n_c] int64, label + local point · K)."""
    total = 0.0
    for idx in idx_chunks:
        w = weights.to(idx.device)[:, None].expand_as(idx)
        diff = torch.bincount(idx.reshape(-1), weights=w.reshape(-1))
        total += float(diff.abs().sum())
    return total / n_points


def noise_floor(preds: Tensor, *, size: int | tuple[int, int] | None = None,
                n_splits: int = 100, method: str = "split",
                generator: torch.Generator | int | None = 0) -> float:
    """The ℓ1 distance two independent ensembles show when drawn from the *same* distribution.

    Read :func:`l1_distance` against this number: ℓ1 ≈ floor means "indistinguishable from
    one distribution with this many members", ℓ1 ≫ floor means "different distributions".

    Args:
        preds: int tensor [M, N], labels of M *independent* runs (i.i.d. members) at N points.
        size: sizes of the two ensembles to be compared: an int a (both have a members), a
            pair (a, b), or None for (M, M).
        n_splits: number of random splits (``"split"``) or resample pairs (``"bootstrap"``)
            averaged.
        method: ``"split"`` (default) or ``"bootstrap"``, see below.
        generator: a ``torch.Generator`` (advanced in place), an int seed for a fresh CPU
            generator (default 0: the same preds give the same floor), or None for torch's
            global RNG.

    Returns:
        The estimated floor, E[ℓ1] of two ensembles of sizes (a, b) drawn from the members'
        distribution, as a Python float in [0, 2].

    **What it estimates.** floor(a, b) = mean_n Σ_k E|p̂_nk − q̂_nk| with p̂, q̂ the label
    shares of independent a- and b-member ensembles. Where the counts are near-normal
    (a·p_nk and a·(1 − p_nk) not small), E|p̂_nk − q̂_nk| = √(2/π)·√(p_nk(1 − p_nk))·√(1/a + 1/b),
    so the floor scales as √(1/a + 1/b) (as 1/√a for a = b).

    **method="split".** Permute the M members at random and split them into two disjoint
    halves of h = ⌊M/2⌋ members (the odd one out, if any, is left out); take ℓ1 between
    the halves' label distributions; average over ``n_splits`` permutations; rescale:
    floor(a, b) ≈ ℓ1_half · √((1/a + 1/b) / (2/h)), i.e. ℓ1_half · √(h/a) for a = b.
    The two halves are disjoint sets of i.i.d. members, so ℓ1_half is an *unbiased*
    estimate of floor(h, h) (averaging over splits only lowers its variance). The rescaling
    is exact only in the normal regime above. Outside it: a label with p_nk ∈ {0, 1}
    contributes exactly 0 at every size (so the rescaling is exact there); a rare label with
    a·p_nk ≲ 1 contributes ≈ 2·p_nk at *any* size (one stray vote in either ensemble), which
    decays slower than 1/√a. So extrapolating to ensembles larger than h (including the
    default (M, M)) *understates* the floor by up to the rare labels' share, and
    extrapolating to smaller ones (a < h) overstates it. For a = b = h the estimate is
    unbiased; with 20–64 members and labels that are not rare, the rescaled value was within
    3 % of the exact floor for sizes 16–200 (tests/ensemble/test_metrics.py).

    **method="bootstrap".** Draw two independent resamples of a and b members *with
    replacement* from the M members, take ℓ1 between their label distributions, average
    over ``n_splits`` pairs. No rescaling; but it measures the floor of the *empirical*
    distribution p̂ (the M members' shares), not of the true p, and that understates it:
    E[p̂(1 − p̂)] = p(1 − p)(1 − 1/M), labels no member predicted vanish, and the per-label
    floor is concave in p (2p(1 − p) for a = b = 1; ∝ √(p(1 − p)) in the normal regime;
    checked numerically for a = b ≤ 20), so by Jensen the bootstrap floor is biased *low*
    (it does not overstate in expectation), markedly so when
    M is small or labels are rare. Prefer "split"; use "bootstrap" for sizes near or above
    M where the split rescaling is a long extrapolation, keeping its low bias in mind.
    """
    fn = "noise_floor"
    preds = _check_preds(preds, fn)
    M, N = preds.shape
    if N == 0:
        raise ValueError(f"{fn}: no points (N = 0)")
    if size is None:
        a, b = M, M
    elif isinstance(size, tuple):
        if len(size) != 2:
            raise ValueError(f"{fn}: size must be an int or a pair (a, b), got {size!r}")
        a, b = (_check_positive_int(s, "size", fn) for s in size)
    else:
        a = b = _check_positive_int(size, "size", fn)
    _check_positive_int(n_splits, "n_splits", fn)
    if method not in ("split", "bootstrap"):
        raise ValueError(f"{fn}: method must be 'split' or 'bootstrap', got {method!r}")
    if method == "split" and M < 2:
        raise ValueError(f"{fn}: method='split' needs at least 2 members, got M = {M}")
    gen = _make_generator(generator, fn)

    # Compact the labels (only those that occur matter for ℓ1), then offset them by point
    # so that one bincount per chunk of points gives all per-(point, label) sums at once.
    _, inv = torch.unique(preds, return_inverse=True)
    K = int(inv.max()) + 1
    step = max(1, _CHUNK_ELEMENTS // max(M * K, K))
    idx_chunks = []
    for n0 in range(0, N, step):
        part = inv[:, n0:n0 + step]
        idx_chunks.append(part + torch.arange(part.shape[1], device=part.device) * K)

    total = 0.0
    if method == "split":
        h = M // 2
        for _ in range(n_splits):
            perm = torch.randperm(M, generator=gen)
            w = torch.zeros(M, dtype=torch.float64)
            w[perm[:h]] = 1.0
            w[perm[h:2 * h]] = -1.0
            total += _signed_l1(idx_chunks, w, N) / h  # integer counts: exact until here
        return total / n_splits * math.sqrt((1.0 / a + 1.0 / b) * h / 2.0)
    for _ in range(n_splits):
        ca = torch.bincount(torch.randint(M, (a,), generator=gen), minlength=M).double()
        cb = torch.bincount(torch.randint(M, (b,), generator=gen), minlength=M).double()
        # integer weights keep the sums exact (a point with one label gives exactly 0)
        total += _signed_l1(idx_chunks, ca * b - cb * a, N) / (a * b)
    return total / n_splits


# --------------------------------------------------------------------------------------
# disagreement


def disagreement(preds_a: Tensor, preds_b: Tensor) -> Tensor:
    """Fraction of predictions on which two sets of labels differ.

    Args:
        preds_a, preds_b: integer label tensors, one of
            - both [N]: fraction of points n with a[n] ≠ b[n];
            - both [M, N]: member i of a is compared with member i of b (paired by index,
              e.g. the same runs at two checkpoints): fraction of the M·N (member, point)
              pairs with a[i, n] ≠ b[i, n];
            - [M, N] and [N] (either order): every member against one labelling (e.g. the
              true labels: the members' mean error rate).

    Returns:
        0-d float64 tensor in [0, 1].
    """
    fn = "disagreement"
    a = _check_preds(preds_a, fn, "preds_a", ndim=(1, 2))
    b = _check_preds(preds_b, fn, "preds_b", ndim=(1, 2))
    if a.shape[-1] != b.shape[-1] or (a.ndim == b.ndim == 2 and a.shape != b.shape):
        raise ValueError(f"{fn}: shapes must be equal ([N] or [M, N]) or [M, N] vs [N], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{fn}: preds_a is on {a.device} but preds_b is on {b.device}")
    if a.shape[-1] == 0:
        raise ValueError(f"{fn}: no points (N = 0)")
    differ = (a != b).sum()
    return differ.double() / max(a.numel(), b.numel())


def pairwise_disagreement(preds: Tensor) -> Tensor:
    """Disagreement rate between every pair of members.

    Args:
        preds: integer tensor [M, N] (members × points).

    Returns:
        float64 tensor [M, M] on ``preds``' device; ``out[i, j]`` = fraction of points n
        with preds[i, n] ≠ preds[j, n]. Exactly symmetric with a zero diagonal. Costs
        O(M²·N) comparisons, done in chunks of rows.
    """
    fn = "pairwise_disagreement"
    preds = _check_preds(preds, fn)
    M, N = preds.shape
    if N == 0:
        raise ValueError(f"{fn}: no points (N = 0)")
    counts = torch.empty(M, M, dtype=torch.int64, device=preds.device)
    rows = max(1, _CHUNK_ELEMENTS // (M * N))
    for i in range(0, M, rows):
        counts[i:i + rows] = (preds[i:i + rows, None, :] != preds[None, :, :]).sum(dim=2)
    return counts.double() / N


# --------------------------------------------------------------------------------------
# weight averaging (SWA)


def _state_dict_of(obj: Any, i: int, fn: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{fn}: item {i} is a mapping but its entry {k!r} is a "
                                f"{type(v).__name__}, not a tensor; pass a model.state_dict()")
        return obj
    raise TypeError(f"{fn}: item {i} must be an nn.Module or a state_dict, "
                    f"got {type(obj).__name__}")


def _is_ensemble(obj: Any) -> bool:
    return hasattr(obj, "n_members") and callable(getattr(obj, "member", None))


def _as_items(models: Any, fn: str) -> list[Any]:
    if _is_ensemble(models):
        return [models.member(i) for i in range(models.n_members)]
    if isinstance(models, (Tensor, Mapping)) or (
            isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList)):
        raise TypeError(f"{fn}: pass a list of models or state_dicts (or an ensemble), "
                        f"got a single {type(models).__name__}")
    if not isinstance(models, Iterable):
        raise TypeError(f"{fn}: models must be a list of nn.Modules or state_dicts, or an "
                        f"ensemble, got {type(models).__name__}")
    items = list(models)
    if not items:
        raise ValueError(f"{fn}: nothing to average (empty list)")
    return items


def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Entrywise mean of state_dicts with the same keys, shapes and dtypes.

    Args:
        state_dicts: T ≥ 1 mappings name → tensor (e.g. ``model.state_dict()`` snapshots).

    Returns:
        A new dict in the first state_dict's key order. Floating (and complex) entries are
        the mean over the T inputs, accumulated in float64 (complex128) and cast back to
        their dtype, on the first input's device; other entries (e.g. BatchNorm's int64
        ``num_batches_tracked``) are copies of the first input's. Floating buffers such as
        BatchNorm running statistics are averaged too; recompute them for the averaged
        weights (see :func:`average_weights`).
    """
    return _average([_state_dict_of(sd, i, "average_state_dicts")
                     for i, sd in enumerate(state_dicts)], "average_state_dicts")


def _check_same_layout(dicts: Sequence[Mapping[str, Tensor]], fn: str, noun: str,
                       what: str, *, check_dtype: bool) -> None:
    """Raise ValueError unless every dict has dict 0's keys and shapes (and dtypes)."""
    ref = dicts[0]
    for i, d in enumerate(dicts[1:], start=1):
        if set(d) != set(ref):
            missing, extra = sorted(set(ref) - set(d)), sorted(set(d) - set(ref))
            raise ValueError(f"{fn}: {noun} {i} has different {what} from {noun} 0: missing "
                             f"{missing[:5]}, unexpected {extra[:5]}")
        for k, t in ref.items():
            if d[k].shape != t.shape or (check_dtype and d[k].dtype != t.dtype):
                raise ValueError(f"{fn}: entry {k!r} of {noun} {i} is {d[k].dtype} "
                                 f"{tuple(d[k].shape)}, {noun} 0 has {t.dtype} "
                                 f"{tuple(t.shape)}")


def _average(sds: list[Mapping[str, Tensor]], fn: str) -> dict[str, Tensor]:
    if not sds:
        raise ValueError(f"{fn}: nothing to average (empty list)")
    ref = sds[0]
    _check_same_layout(sds, fn, "item", "keys", check_dtype=True)
    out: dict[str, Tensor] = {}
    for k, t in ref.items():
        if not (t.is_floating_point() or t.is_complex()):
            out[k] = t.detach().clone()
            continue
        wide = torch.complex128 if t.is_complex() else torch.float64
        acc = t.detach().to(wide, copy=True)
        for sd in sds[1:]:
            acc += sd[k].detach().to(device=t.device, dtype=wide)
        out[k] = (acc / len(sds)).to(t.dtype)
    return out


class _Counted:
    """Iterable over the batches of ``data`` that counts how many it handed out."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.count = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.count += 1
            yield batch


def average_weights(models: Any, *, data: Tensor | Iterable[Any] | None = None,
                    batch_size: int = 256, template: nn.Module | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Stochastic weight averaging: one model whose weights are the mean of several.

    Args:
        models: a list of T ≥ 1 models (nn.Modules of the same architecture) and/or their
            state_dicts (e.g. epoch snapshots, or ``ens.member(i)`` for several i); or an
            ensemble (anything with ``n_members`` and ``member(i)``), whose M members are
            averaged into one ordinary model.
        data: inputs for recomputing BatchNorm running statistics of the averaged model:
            a tensor X [N, ...] (split into batches of ``batch_size`` along dim 0) or an
            iterable of batches, each a tensor or a tuple/list whose first element is the
            input (a DataLoader of (x, y) works). None: leave the running statistics at the
            average of the inputs' ones — these are *not* the statistics of the averaged
            weights, so do pass data when the model has BatchNorm.
        batch_size: batch size when ``data`` is a tensor.
        template: the model to copy when ``models`` holds only state_dicts (ignored
            otherwise unless given, in which case it is the one copied).
        device: where batches are moved before the forward pass; None = the device of the
            averaged model's first parameter or buffer.

    Returns:
        A new module, a deep copy of ``template`` or of the first nn.Module in ``models``
        (its train/eval mode included), with the averaged state (see
        :func:`average_state_dicts`: floating tensors are the mean, others come from the
        first item). With ``data`` its BatchNorm statistics are then recomputed by
        ``torch.optim.swa_utils.update_bn``: running stats reset, momentum None (each
        batch's statistics weighted equally — with equal batch sizes ``running_mean`` is
        exactly the mean of the layer's inputs over the data and ``running_var`` the mean
        of the per-batch unbiased variances), forward passes in train mode under
        ``no_grad``, mode restored. The inputs are not modified.
    """
    fn = "average_weights"
    items = _as_items(models, fn)
    sds = [_state_dict_of(x, i, fn) for i, x in enumerate(items)]
    if template is not None and not isinstance(template, nn.Module):
        raise TypeError(f"{fn}: template must be an nn.Module, got {type(template).__name__}")
    base = template if template is not None else next(
        (x for x in items if isinstance(x, nn.Module)), None)
    if base is None:
        raise TypeError(f"{fn}: only state_dicts given; pass template=<a model of the same "
                        "architecture>, or use average_state_dicts for a plain dict")
    _check_positive_int(batch_size, "batch_size", fn)
    avg = _average(sds, fn)
    model = copy.deepcopy(base)
    own = model.state_dict()
    if set(own) != set(avg):
        missing, extra = sorted(set(own) - set(avg)), sorted(set(avg) - set(own))
        raise ValueError(f"{fn}: the model to fill ({type(model).__name__}) does not match the "
                         f"averaged state: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in own.items():
        if t.shape != avg[k].shape:
            raise ValueError(f"{fn}: entry {k!r} is {tuple(t.shape)} in the model to fill but "
                             f"{tuple(avg[k].shape)} in the averaged state")
    model.load_state_dict(avg)
    if data is None:
        return model

    if isinstance(data, Tensor):
        if data.ndim < 1 or data.shape[0] == 0:
            raise ValueError(f"{fn}: data must be a non-empty tensor [N, ...], got shape "
                             f"{tuple(data.shape)}")
        batches: Iterable[Any] = data.split(batch_size)
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise TypeError(f"{fn}: data must be a tensor [N, ...] or an iterable of batches, "
                        f"got {type(data).__name__}")
    if device is None:
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    counted = _Counted(batches)
    torch.optim.swa_utils.update_bn(counted, model, device=device)
    if has_bn and counted.count == 0:
        raise ValueError(f"{fn}: data yielded no batches, so the BatchNorm statistics could "
                         "not be recomputed")
    return model


# --------------------------------------------------------------------------------------
# distances between weight snapshots


def _named_weights(obj: Any, keys: Sequence[str] | None, fn: str, i: int) -> dict[str, Tensor]:
    """name → tensor of the floating weights of a module or state_dict (see flatten_params)."""
    if isinstance(obj, nn.Module):
        named = {k: p.detach() for k, p in obj.named_parameters() if p.is_floating_point()}
        what = "parameter"
    elif isinstance(obj, Mapping):
        named = {}
        for k, t in obj.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: snapshot {i}: entry {k!r} is a {type(t).__name__}, "
                                "not a tensor")
            if t.is_floating_point() and (keys is not None or not k.endswith(_BN_STAT_SUFFIXES)):
                named[k] = t.detach()
        what = "floating entry"
    else:
        raise TypeError(f"{fn}: snapshot {i} must be an nn.Module, a state_dict or a 1-D "
                        f"tensor, got {type(obj).__name__}")
    if keys is None:
        return named
    absent = [k for k in keys if k not in named]
    if absent:
        raise ValueError(f"{fn}: snapshot {i} has no {what} named {absent[:5]}")
    return {k: named[k] for k in keys}


def flatten_params(module_or_state_dict: nn.Module | Mapping[str, Tensor],
                   keys: Sequence[str] | None = None) -> Tensor:
    """All floating weights of a model, concatenated into one float64 vector.

    Args:
        module_or_state_dict: an nn.Module — its floating ``named_parameters()`` (frozen
            ones included; buffers never) — or a state_dict — all its floating tensors
            except BatchNorm statistics (keys ending in ``running_mean``/``running_var``),
            which keeps other floating buffers; pass ``keys`` to select exactly.
        keys: names to take, in this order (for a module: parameter names); None = all of
            the above, in their order.

    Returns:
        float64 tensor [P] on the device of the weights (CPU if there are none), P = the
        total number of elements.
    """
    named = _named_weights(module_or_state_dict, keys, "flatten_params", 0)
    if not named:
        return torch.zeros(0, dtype=torch.float64)
    device = next(iter(named.values())).device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64)
                      for t in named.values()])


def pairwise_distances(snapshots: Sequence[Any] | Tensor, *,
                       keys: Sequence[str] | None = None) -> Tensor:
    """Euclidean distances between T weight snapshots.

    Args:
        snapshots: either a float tensor [T, P] or a list of T 1-D float tensors [P]
            (flattened weights), or a list of T modules and/or state_dicts, whose weights
            are selected as in :func:`flatten_params` (modules: floating parameters;
            state_dicts: floating entries except BatchNorm running statistics) and matched
            by name (every snapshot must have the same names and shapes as the first).
        keys: restrict to these names (modules/state_dicts only).

    Returns:
        float64 tensor [T, T] on the CPU: ``out[i, j]`` = ‖w_i − w_j‖₂. Computed from
        direct differences in float64 (``torch.cdist`` without the ‖a‖² + ‖b‖² − 2ab
        shortcut, which cancels catastrophically for nearby snapshots), so it is exactly
        symmetric with a zero diagonal. Memory: the stacked [T, P] float64 matrix.
    """
    fn = "pairwise_distances"
    if isinstance(snapshots, Tensor):
        if snapshots.ndim != 2:
            raise ValueError(f"{fn}: a tensor of snapshots must be [T, P], got shape "
                             f"{tuple(snapshots.shape)}")
        items: list[Any] = list(snapshots)
    else:
        items = list(snapshots)
    if not items:
        raise ValueError(f"{fn}: no snapshots")
    n_tensors = sum(isinstance(x, Tensor) for x in items)
    if n_tensors == len(items):
        if keys is not None:
            raise ValueError(f"{fn}: keys= only applies to modules and state_dicts")
        for i, x in enumerate(items):
            if x.ndim != 1 or not x.is_floating_point():
                raise ValueError(f"{fn}: snapshot {i} must be a 1-D floating tensor [P], got "
                                 f"{x.dtype} {tuple(x.shape)}")
            if x.shape != items[0].shape:
                raise ValueError(f"{fn}: snapshot {i} has {x.numel()} entries, snapshot 0 "
                                 f"has {items[0].numel()}")
        vectors = [x.detach() for x in items]
    elif n_tensors:
        raise TypeError(f"{fn}: do not mix flattened tensors with modules/state_dicts; "
                        "flatten them all with flatten_params")
    else:
        named = [_named_weights(x, keys, fn, i) for i, x in enumerate(items)]
        ref = named[0]
        _check_same_layout(named, fn, "snapshot", "weights", check_dtype=False)
        vectors = [torch.cat([nd[k].reshape(-1).double().cpu() for k in ref])
                   if ref else torch.zeros(0, dtype=torch.float64) for nd in named]
    X = torch.stack([v.to(device="cpu", dtype=torch.float64) for v in vectors])
    return torch.cdist(X[None], X[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
