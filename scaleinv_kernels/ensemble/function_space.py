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

Also here: member disagreement (:func:`disagreement`, :func:`pairwise_disagreement`).
Statistics of the weights themselves (averaging, distances) live in
:mod:`scaleinv_kernels.ensemble.weight_space`.

An "ensemble" is duck-typed (no import of the Ensemble class, which would create a cycle):
:func:`predict` needs ``n_members``, ``forward_shared(x, members=slice)``, ``training``,
``train()``/``eval()`` and ``parameters()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "disagreement",
    "l1_distance",
    "label_distribution",
    "noise_floor",
    "pairwise_disagreement",
    "predict",
]

# Work tensors of more entries than this are processed in chunks (points or member rows),
# so that memory stays ~100 MiB whatever N, M or K.
_CHUNK_ELEMENTS = 1 << 23

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
    3 % of the exact floor for sizes 16–200 (tests/ensemble/test_function_space.py).

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
