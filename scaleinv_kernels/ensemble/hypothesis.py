"""Calibrated two-sample statistics for two ensembles' predicted labels.

Two ensembles of independently trained nets, A with M1 and B with M2 members, predict
labels ``preds_a`` [M1, P] and ``preds_b`` [M2, P] at the same P points (K classes). Per
point n the members' labels estimate the label distributions p_n (A) and q_n (B). The
question "are the two distributions of trained nets the same in function space?" gets
three answers here:

* :func:`l1_statistic`: ℓ1 = mean_n Σ_k |p̂_nk − q̂_nk| (the paper's distance);
* :func:`permutation_test`: the p-value of ℓ1 under H0 "the M1 + M2 members are
  exchangeable" (A and B drawn from ONE distribution), from random re-splits of the
  pooled members; exact in level (P(p ≤ α) ≤ α under H0 for every α, any sizes, any P, K)
  up to the Monte-Carlo resolution 1/(R + 1), no normal approximation, no noise-floor
  rescaling;
* :func:`d2_statistic` / :func:`d2_bootstrap`: a *debiased effect size*
  D² = mean_n Σ_k (p_nk − q_nk)², estimated without the sampling noise of finite
  ensembles (an unbiased U-statistic, so E[D̂²] = 0 exactly when p = q and D̂² can be
  negative), with a member-bootstrap confidence interval; compared with
  :func:`equivalence_margin` it supports the claim "equal" (a small p-value alone only
  says "different", a large one only "not shown different").

:func:`holm` corrects a family of p-values (several pairs × several evaluations) for
multiple testing (family-wise error ≤ α under any dependence).

Everything is pure torch (CPU), deterministic given the ``generator`` seed, and exact in
its arithmetic: counts are summed in float32 from 0/1 entries (exact below 2^24) and the
statistics compared on an integer scale, so ties between re-splits are detected exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BootstrapResult",
    "PermutationResult",
    "d2_bootstrap",
    "d2_statistic",
    "equivalence_margin",
    "holm",
    "l1_statistic",
    "label_counts",
    "permutation_test",
]

# float32 work tensors of at most this many entries per chunk (~32 MiB)
_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------
# validation


def _check_int(value: Any, name: str, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _check_pair(preds_a: Any, preds_b: Any, num_classes: int, fn: str,
                min_members: int = 1) -> tuple[Tensor, Tensor, int]:
    """Both [M, P] integer tensors with the same P and labels in [0, K)."""
    K = _check_int(num_classes, "num_classes", fn, 1)
    out = []
    for name, t in (("preds_a", preds_a), ("preds_b", preds_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor [M, P] of int labels, got "
                            f"{type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{fn}: {name} must be [M, P] (members × points), got shape "
                             f"{tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must hold integer labels, got {t.dtype}")
        if t.shape[0] < min_members:
            raise ValueError(f"{fn}: {name} needs >= {min_members} members, got {t.shape[0]}")
        if t.shape[1] == 0:
            raise ValueError(f"{fn}: {name} has no points (P = 0)")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= K:
            raise ValueError(f"{fn}: {name} holds label {lo if lo < 0 else hi}, outside "
                             f"[0, {K})")
        out.append(t.detach().to("cpu", torch.int64))
    a, b = out
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: preds_a has {a.shape[1]} points but preds_b has "
                         f"{b.shape[1]} (must be the same points)")
    return a, b, K


def _generator(generator: torch.Generator | int | None, fn: str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"{fn}: generator must be a torch.Generator, an int seed or None, "
                        f"got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


# --------------------------------------------------------------------------------------
# counts and the ℓ1 statistic


def label_counts(preds: Tensor, num_classes: int) -> Tensor:
    """int64 [P, K]: ``out[n, k]`` = #{members i: preds[i, n] = k} for preds [M, P]."""
    fn = "label_counts"
    a, _, K = _check_pair(preds, preds, num_classes, fn)
    M, P = a.shape
    flat = (a + torch.arange(P) * K).reshape(-1)
    return torch.bincount(flat, minlength=P * K).reshape(P, K)


def l1_statistic(preds_a: Tensor, preds_b: Tensor, num_classes: int) -> float:
    """ℓ1 = mean over points of Σ_k |p̂_k − q̂_k|, p̂ and q̂ the label shares of the two
    ensembles (in [0, 2]; 0 = the same shares at every point)."""
    a, b, K = _check_pair(preds_a, preds_b, num_classes, "l1_statistic")
    ca, cb = label_counts(a, K).double(), label_counts(b, K).double()
    return float((ca / a.shape[0] - cb / b.shape[0]).abs().sum(1).mean())


def _one_hot_columns(pooled: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """For pooled labels [M, P]: a float32 0/1 matrix [M, C] over the C (point, label)
    columns that some but not all members predict, and their totals [C] (float64).

    Columns nobody predicts contribute 0 to every split's ℓ1, and so do columns every
    member predicts (each group then holds its whole size): dropping them changes no
    statistic and makes the permutation matmuls smaller (most points are unanimous)."""
    M, P = pooled.shape
    flat = pooled + torch.arange(P) * K  # [M, P] column index
    totals = torch.bincount(flat.reshape(-1), minlength=P * K)
    keep = ((totals > 0) & (totals < M)).nonzero().squeeze(1)
    col = torch.full((P * K,), -1, dtype=torch.int64)
    col[keep] = torch.arange(keep.numel())
    onehot = torch.zeros(M, keep.numel(), dtype=torch.float32)
    local = col[flat]  # [M, P]; -1 where the column was dropped
    rows = torch.arange(M)[:, None].expand_as(local)
    mask = local >= 0
    onehot[rows[mask], local[mask]] = 1.0
    return onehot, totals[keep].double()


def _scaled_l1(counts_a: Tensor, totals: Tensor, m1: int, m2: int) -> Tensor:
    """Σ over columns |c_a·M2 − c_b·M1| (= ℓ1 · P · M1 · M2, an integer) per row of
    counts_a [R, C], with c_b = totals − c_a; float64, exact for the sizes used here."""
    diff = counts_a.double() * (m1 + m2) - totals * m1  # = c_a·M2 − c_b·M1
    return diff.abs().sum(1)


# --------------------------------------------------------------------------------------
# permutation test


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`permutation_test`.

    Attributes:
        statistic: the observed ℓ1 (:func:`l1_statistic`).
        p_value: (1 + #{re-splits with ℓ1* ≥ ℓ1}) / (R + 1), in [1/(R + 1), 1].
        n_permutations: R.
        null_mean: mean ℓ1 over the R re-splits — the noise floor of ensembles of
            sizes (M1, M2) under H0, estimated from these very members.
    """

    statistic: float
    p_value: float
    n_permutations: int
    null_mean: float


def permutation_test(preds_a: Tensor, preds_b: Tensor, num_classes: int, *,
                     n_permutations: int = 2000,
                     generator: torch.Generator | int | None = 0) -> PermutationResult:
    """Permutation test of "A and B are draws from one distribution" with the ℓ1 statistic.

    Args:
        preds_a, preds_b: integer labels [M1, P] and [M2, P] (members × the same points).
        num_classes: K (labels in [0, K)).
        n_permutations: R ≥ 1 random re-splits of the pooled M1 + M2 members into groups
            of M1 and M2 (uniform over all such splits, drawn with replacement).
        generator: a ``torch.Generator`` (advanced in place), an int seed (default 0: the
            same inputs give the same p-value), or None for a fresh random seed.

    Returns:
        :class:`PermutationResult`. The p-value counts the observed split as one of the
        re-splits, p = (1 + #{ℓ1* ≥ ℓ1_obs}) / (R + 1), which makes the test valid at
        every R: under H0 (members exchangeable) P(p ≤ α) ≤ α. Its Monte-Carlo error
        against the exact permutation p-value (over all C(M1 + M2, M1) splits) has
        standard deviation ≤ √(p(1 − p)/R) (≤ 0.0049 at p = 0.05, R = 2000).

    Cost: one [R, M1 + M2] × [M1 + M2, C] float32 matmul, C ≤ P·K the (point, label)
    columns where the members disagree; in chunks of R so that memory stays ~32 MiB.
    """
    fn = "permutation_test"
    a, b, K = _check_pair(preds_a, preds_b, num_classes, fn)
    R = _check_int(n_permutations, "n_permutations", fn, 1)
    gen = _generator(generator, fn)
    m1, m2 = a.shape[0], b.shape[0]
    M, P = m1 + m2, a.shape[1]
    pooled = torch.cat([a, b])
    onehot, totals = _one_hot_columns(pooled, K)
    observed = _scaled_l1(onehot[:m1].sum(0, keepdim=True), totals, m1, m2)[0]
    scale = P * m1 * m2
    if onehot.shape[1] == 0:  # every point unanimous across all members: ℓ1 ≡ 0
        return PermutationResult(0.0, 1.0, R, 0.0)
    chunk = max(1, min(R, _CHUNK_ELEMENTS // max(onehot.shape[1], M)))
    exceed, null_sum = 0, 0.0
    for r0 in range(0, R, chunk):
        r = min(chunk, R - r0)
        # a uniform random split: the first M1 of a uniform random permutation
        order = torch.rand(r, M, generator=gen).argsort(dim=1)
        select = torch.zeros(r, M, dtype=torch.float32)
        select.scatter_(1, order[:, :m1], 1.0)
        stats = _scaled_l1(select @ onehot, totals, m1, m2)
        # both sides are integers held exactly in float64: the half-unit guard makes
        # ties (ℓ1* = ℓ1_obs, e.g. the swapped split when M1 = M2) count as exceeding
        exceed += int((stats >= observed - 0.5).sum())
        null_sum += float(stats.sum())
    return PermutationResult(statistic=float(observed) / scale,
                             p_value=(1 + exceed) / (R + 1), n_permutations=R,
                             null_mean=null_sum / R / scale)


# --------------------------------------------------------------------------------------
# Holm


def holm(p_values: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values of a family of m tests (any shape; NaN-free).

    Sorted ascending p_(1) ≤ … ≤ p_(m), the adjusted values are
    p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)); rejecting every hypothesis with
    p̃ ≤ α controls the family-wise error rate at α under any dependence between the
    tests (Holm 1979), and is uniformly more powerful than Bonferroni. Returns a float64
    array of the input's shape, in the input's order.
    """
    p = np.asarray(p_values.detach().cpu() if isinstance(p_values, Tensor) else p_values,
                   dtype=np.float64)
    if p.size == 0:
        return p.copy()
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("holm: p-values must lie in [0, 1] (no NaN)")
    flat = p.reshape(-1)
    m = flat.size
    order = np.argsort(flat, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * flat[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.reshape(p.shape)


# --------------------------------------------------------------------------------------
# debiased effect size D²


def _d2_from_counts(ca: Tensor, cb: Tensor, m1: Tensor | int, m2: Tensor | int,
                    n_points: int) -> Tensor:
    """Unbiased D² from counts [..., C] (float64) of ensembles of sizes m1, m2 (≥ 2):
    mean over points of Σ_k [n(n−1)/(M1(M1−1)) + m(m−1)/(M2(M2−1)) − 2nm/(M1M2)]."""
    within_a = (ca * (ca - 1)).sum(-1) / (m1 * (m1 - 1))
    within_b = (cb * (cb - 1)).sum(-1) / (m2 * (m2 - 1))
    cross = (ca * cb).sum(-1) / (m1 * m2)
    return (within_a + within_b - 2 * cross) / n_points


def _d2_resampled(wa: Tensor, wb: Tensor, oa: Tensor, ob: Tensor, n_points: int) -> Tensor:
    """D̂² of bootstrap replicates: member multiplicities wa [R, M1], wb [R, M2] (float32,
    each row sums to M), one-hot label columns oa [M1, C], ob [M2, C].

    The within-ensemble terms count agreeing pairs of draws of DIFFERENT original members
    only, Σ_{i≠j} w_i w_j 1[l_i = l_j] / Σ_{i≠j} w_i w_j = Σ_k (n_k² − Σ_{i∈k} w_i²) /
    (M² − Σ_i w_i²): a member drawn twice does not "agree with itself". Counting those
    self-pairs (n_k(n_k − 1) on the resampled counts) would add a random number of sure
    agreements to every replicate and inflate the bootstrap spread several-fold (measured:
    5× the sampling sd of D̂² for 24 members per ensemble)."""
    def within(w: Tensor, o: Tensor) -> Tensor:
        n = (w @ o).double()                      # [R, C] resampled counts
        self_pairs = ((w * w) @ o).double()       # [R, C] Σ_{i∈k} w_i²
        m = w.shape[1]
        pairs = float(m) ** 2 - (w.double() ** 2).sum(1)  # [R] Σ_{i≠j} w_i w_j
        # 0/0 = NaN when every draw is the same member (no distinct pair): dropped later
        return (n * n - self_pairs).sum(1) / pairs

    cross = ((wa @ oa).double() * (wb @ ob).double()).sum(1) / (wa.shape[1] * wb.shape[1])
    return (within(wa, oa) + within(wb, ob) - 2 * cross) / n_points


def d2_statistic(preds_a: Tensor, preds_b: Tensor, num_classes: int) -> float:
    """Unbiased estimate of D² = mean_n Σ_k (p_nk − q_nk)² from two ensembles.

    The plug-in Σ_k (p̂_k − q̂_k)² overstates D² by the sampling noise
    Σ_k [p_k(1 − p_k)/M1 + q_k(1 − q_k)/M2] (it is > 0 even for p = q). Here each square is
    replaced by its U-statistic: Σ_k p_k² by Σ_k n_k(n_k − 1)/(M1(M1 − 1)) (the chance that
    two *different* members of A agree), likewise for q, and Σ_k p_k q_k by
    Σ_k n_k m_k/(M1·M2) (a member of A agrees with one of B); each is unbiased for members
    drawn independently, so E[D̂²] = D² exactly, 0 under H0 (D̂² is then negative about half
    the time). Needs M1, M2 ≥ 2.
    """
    a, b, K = _check_pair(preds_a, preds_b, num_classes, "d2_statistic", min_members=2)
    ca, cb = label_counts(a, K).double(), label_counts(b, K).double()
    return float(_d2_from_counts(ca.reshape(-1), cb.reshape(-1), a.shape[0], b.shape[0],
                                 a.shape[1]))


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of :func:`d2_bootstrap`.

    Attributes:
        estimate: the unbiased D̂² (:func:`d2_statistic`).
        low, high: the two-sided ``level`` confidence interval.
        level: its nominal coverage.
        n_bootstrap: B, the replicates drawn (see :func:`d2_bootstrap` for the rare
            unusable ones).
        std: the bootstrap standard deviation of D̂².
    """

    estimate: float
    low: float
    high: float
    level: float
    n_bootstrap: int
    std: float


def d2_bootstrap(preds_a: Tensor, preds_b: Tensor, num_classes: int, *,
                 n_bootstrap: int = 1000, level: float = 0.95,
                 generator: torch.Generator | int | None = 0) -> BootstrapResult:
    """D̂² with a member-bootstrap confidence interval.

    Each of the B replicates resamples the M1 members of A with replacement, and
    independently the M2 members of B (the members are the i.i.d. units; points are not
    resampled — they are the fixed test set, shared by both ensembles) and recomputes D̂².

    In a replicate a member drawn several times must not "agree with itself": the
    within-ensemble terms count pairs of draws of different original members only (see
    :func:`_d2_resampled`). The interval is the *centred* percentile interval
    [D̂² + q_{(1−level)/2}(D*² − D̄*²), D̂² + q_{(1+level)/2}(D*² − D̄*²)]: the quantiles
    of the replicates' deviations from their own mean D̄*², around D̂² — robust to any
    residual offset between the replicates' centre and D̂² (a ratio estimator, not
    exactly unbiased under resampling); the spread is what the replicates measure.

    Accuracy of the spread (tests/ensemble/test_hypothesis.py, simulations): away from
    D² = 0 the bootstrap sd matches the sampling sd of D̂² (measured within 10 %). Near
    D² = 0 the U-statistic is degenerate (its linear part vanishes) and the member
    bootstrap overstates the spread — measured 1.8× the sampling sd at 24 and at 64
    members per ensemble — so the interval is conservative exactly where an equivalence
    claim is made: its upper bound errs high, which can only make "equal" harder to
    claim, never easier.
    """
    fn = "d2_bootstrap"
    a, b, K = _check_pair(preds_a, preds_b, num_classes, fn, min_members=2)
    B = _check_int(n_bootstrap, "n_bootstrap", fn, 2)
    if not isinstance(level, float) or not 0.0 < level < 1.0:
        raise ValueError(f"{fn}: level must be a float in (0, 1), got {level!r}")
    gen = _generator(generator, fn)
    m1, m2, P = a.shape[0], b.shape[0], a.shape[1]
    estimate = d2_statistic(a, b, K)
    # one-hot over the (point, label) columns either ensemble predicts (others add 0)
    pooled = torch.cat([a, b])
    flat = pooled + torch.arange(P) * K
    totals = torch.bincount(flat.reshape(-1), minlength=P * K)
    keep = (totals > 0).nonzero().squeeze(1)
    col = torch.full((P * K,), -1, dtype=torch.int64)
    col[keep] = torch.arange(keep.numel())
    onehot = torch.zeros(m1 + m2, keep.numel(), dtype=torch.float32)
    onehot[torch.arange(m1 + m2)[:, None].expand_as(flat), col[flat]] = 1.0
    oa, ob = onehot[:m1], onehot[m1:]
    chunk = max(1, min(B, _CHUNK_ELEMENTS // max(keep.numel(), 1)))
    reps = []
    for r0 in range(0, B, chunk):
        r = min(chunk, B - r0)
        wa = torch.zeros(r, m1).scatter_add_(
            1, torch.randint(0, m1, (r, m1), generator=gen), torch.ones(r, m1))
        wb = torch.zeros(r, m2).scatter_add_(
            1, torch.randint(0, m2, (r, m2), generator=gen), torch.ones(r, m2))
        reps.append(_d2_resampled(wa, wb, oa, ob, P))
    d = torch.cat(reps).numpy()
    # a replicate that drew one member M times has no pair of distinct members (chance
    # M^(1−M) per ensemble: 1e-4 at M = 6, nil from M = 10): it is left out
    d = d[np.isfinite(d)]
    if d.size < 2:
        raise ValueError(f"{fn}: fewer than 2 usable bootstrap replicates of {B}")
    dev = d - d.mean()
    lo, hi = np.quantile(dev, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapResult(estimate=estimate, low=estimate + float(lo),
                           high=estimate + float(hi), level=level, n_bootstrap=B,
                           std=float(d.std(ddof=1)))


def equivalence_margin(accuracy_gap: float = 0.02, num_classes: int = 10) -> float:
    """The D² below which two label distributions count as equal: gap²·K/(K − 1).

    Why this number: if the mean accuracies of A and B differ by Δ (more generally, if
    the mean share of any one label differs by Δ), then D² ≥ Δ²·K/(K − 1). Per point the
    difference d = p − q sums to 0, so the K − 1 other labels carry −d_c between them and
    Σ_k d_k² ≥ d_c² + d_c²/(K − 1) (Cauchy–Schwarz); averaging over points,
    mean_n d_nc² ≥ (mean_n d_nc)² = Δ² (Jensen). Equality holds for a shift of Δ at every
    point spread evenly over the other labels — the mildest shift with that accuracy gap.
    So "D² < margin" guarantees that no label's mean share (accuracy included) differs by
    ``accuracy_gap`` or more; any shift that moves accuracy by that much is excluded.
    """
    fn = "equivalence_margin"
    K = _check_int(num_classes, "num_classes", fn, 2)
    if not isinstance(accuracy_gap, float) or not 0.0 < accuracy_gap <= 1.0:
        raise ValueError(f"{fn}: accuracy_gap must be a float in (0, 1], got {accuracy_gap!r}")
    return accuracy_gap**2 * K / (K - 1)

