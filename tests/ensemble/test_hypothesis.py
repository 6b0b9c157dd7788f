"""ensemble.hypothesis against brute-force references: exact permutation p-values by
enumeration, D² by explicit member pairs and by simulation against the true value, Holm by
the textbook step-down loop, calibration of the test under a true null."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from scaleinv_kernels.ensemble.hypothesis import (
    d2_bootstrap,
    d2_statistic,
    equivalence_margin,
    holm,
    l1_statistic,
    label_counts,
    permutation_test,
)


def _draw(probs: torch.Tensor, members: int, gen: torch.Generator) -> torch.Tensor:
    """[members, P] labels, member i at point n ~ Categorical(probs[n]) independently."""
    return torch.multinomial(probs, members, replacement=True, generator=gen).t()


def _random_probs(P: int, K: int, gen: torch.Generator, sharp: float = 1.0) -> torch.Tensor:
    return torch.softmax(sharp * torch.randn(P, K, generator=gen, dtype=torch.float64), 1)


# ---- references (loops, float64, no shared code with the module) ----------------------

def l1_reference(a: torch.Tensor, b: torch.Tensor, K: int) -> float:
    total = 0.0
    for n in range(a.shape[1]):
        for k in range(K):
            pa = sum(int(x) == k for x in a[:, n]) / a.shape[0]
            pb = sum(int(x) == k for x in b[:, n]) / b.shape[0]
            total += abs(pa - pb)
    return total / a.shape[1]


def d2_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pairwise definition: P(two different members of A agree) + same for B
    − 2 P(a member of A agrees with one of B), averaged over points."""
    m1, m2, P = a.shape[0], b.shape[0], a.shape[1]
    total = 0.0
    for n in range(P):
        ca = [int(x) for x in a[:, n]]
        cb = [int(x) for x in b[:, n]]
        aa = sum(ca[i] == ca[j] for i in range(m1) for j in range(m1) if i != j)
        bb = sum(cb[i] == cb[j] for i in range(m2) for j in range(m2) if i != j)
        ab = sum(x == y for x in ca for y in cb)
        total += aa / (m1 * (m1 - 1)) + bb / (m2 * (m2 - 1)) - 2 * ab / (m1 * m2)
    return total / P


def exact_permutation_p(a: torch.Tensor, b: torch.Tensor, K: int) -> float:
    """Share of ALL C(M1+M2, M1) splits with ℓ1 ≥ the observed one (observed included)."""
    pooled = torch.cat([a, b])
    m1, M = a.shape[0], pooled.shape[0]
    obs = l1_reference(a, b, K)
    count = total = 0
    for idx in itertools.combinations(range(M), m1):
        rest = [i for i in range(M) if i not in idx]
        stat = l1_reference(pooled[list(idx)], pooled[rest], K)
        count += stat >= obs - 1e-12  # ℓ1 values are multiples of 1/(P·M1·M2)
        total += 1
    return count / total


def holm_reference(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure as stated: reject p_(1), p_(2), … while
    p_(i) <= alpha / (m − i + 1); stop at the first failure."""
    m = len(p)
    order = sorted(range(m), key=lambda i: (p[i], i))
    rejected = set()
    for rank, i in enumerate(order, start=1):
        if p[i] <= alpha / (m - rank + 1):
            rejected.add(i)
        else:
            break
    return rejected


# ---- ℓ1 and counts ---------------------------------------------------------------------

@pytest.mark.parametrize("m1,m2,P,K", [(3, 5, 7, 4), (6, 6, 11, 3), (1, 2, 1, 2)])
def test_l1_and_counts_match_loops(m1, m2, P, K):
    gen = torch.Generator().manual_seed(m1 * 100 + P)
    a = torch.randint(0, K, (m1, P), generator=gen)
    b = torch.randint(0, K, (m2, P), generator=gen)
    # sums of a few shares: float64 rounding only
    assert l1_statistic(a, b, K) == pytest.approx(l1_reference(a, b, K), rel=1e-12, abs=1e-15)
    counts = label_counts(a, K)
    for n in range(P):
        for k in range(K):
            assert int(counts[n, k]) == sum(int(x) == k for x in a[:, n])


def test_bad_inputs_raise():
    a = torch.zeros(4, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="points"):
        permutation_test(a, torch.zeros(4, 6, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="integer"):
        permutation_test(a.float(), a, 3)
    with pytest.raises(ValueError, match="outside"):
        l1_statistic(a + 3, a, 3)
    with pytest.raises(ValueError, match="members"):
        d2_statistic(a[:1], a, 3)
    with pytest.raises(ValueError, match=r"\[M, P\]"):
        l1_statistic(a[0], a, 3)
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_test(a, a, 3, n_permutations=0)
    with pytest.raises(ValueError, match="level"):
        d2_bootstrap(a, a, 3, level=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, float("nan")])


# ---- permutation test -------------------------------------------------------------------

@pytest.mark.parametrize("m1,m2,P,K,shift,seed", [
    (4, 4, 9, 3, 0.0, 0),   # null, equal sizes (the swapped split ties the observed one)
    (3, 5, 13, 4, 1.5, 1),  # different distributions, unequal sizes
    (5, 4, 6, 2, 0.7, 2),
    (4, 5, 17, 5, 0.0, 3),
])
def test_permutation_p_matches_exact_enumeration(m1, m2, P, K, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    p = _random_probs(P, K, gen)
    q = torch.softmax(torch.log(p) + shift * torch.randn(P, K, generator=gen,
                                                         dtype=torch.float64), 1)
    a, b = _draw(p, m1, gen), _draw(q, m2, gen)
    exact = exact_permutation_p(a, b, K)
    R = 4000
    res = permutation_test(a, b, K, n_permutations=R, generator=seed)
    # the Monte-Carlo p is (1 + Binomial(R, exact)) / (R + 1): mean within 1/(R+1) of
    # exact, sd ≤ sqrt(exact(1−exact)/R); 4.5 sd (two-sided ~7e-6 per case) + the offset
    bound = 4.5 * math.sqrt(exact * (1 - exact) / R) + 1 / (R + 1)
    assert abs(res.p_value - exact) <= bound, (res.p_value, exact, bound)
    assert res.statistic == pytest.approx(l1_reference(a, b, K), rel=1e-12)


def test_permutation_p_smallest_when_disjoint():
    # every member of A says 0 and of B says 1 at every point: only the observed split
    # (and, with M1 = M2, its mirror) reaches ℓ1 = 2, so exact p = 2 / C(12, 6)
    a = torch.zeros(6, 5, dtype=torch.int64)
    b = torch.ones(6, 5, dtype=torch.int64)
    res = permutation_test(a, b, 2, n_permutations=3000, generator=5)
    exact = 2 / math.comb(12, 6)
    assert res.statistic == 2.0
    assert abs(res.p_value - exact) <= 4.5 * math.sqrt(exact / 3000) + 1 / 3001


def test_permutation_unanimous_gives_p_one():
    a = torch.full((5, 8), 2, dtype=torch.int64)
    res = permutation_test(a, a[:3], 4, n_permutations=50)
    assert res.statistic == 0.0 and res.p_value == 1.0


def test_permutation_seeded_and_chunk_independent(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    a = torch.randint(0, 4, (7, 30), generator=gen)
    b = torch.randint(0, 4, (9, 30), generator=gen)
    r1 = permutation_test(a, b, 4, n_permutations=500, generator=3)
    r2 = permutation_test(a, b, 4, n_permutations=500, generator=3)
    assert r1 == r2
    import scaleinv_kernels.ensemble.hypothesis as h
    # the random draws consume the generator chunk by chunk in the same order, so a tiny
    # chunk gives the same splits, hence the same p-value
    monkeypatch.setattr(h, "_CHUNK_ELEMENTS", 64)
    assert permutation_test(a, b, 4, n_permutations=500, generator=3).p_value == r1.p_value


def test_permutation_calibrated_under_null_and_powerful_under_alternative():
    """Under H0 (both ensembles from one distribution) the rejection rate at 0.05 must be
    ≤ 0.05 (the test is exact up to Monte-Carlo); under a shift it must be large."""
    gen = torch.Generator().manual_seed(2024)
    n_draws, R, alpha = 400, 199, 0.05
    rejections, rejections_alt = 0, 0
    for i in range(n_draws):
        p = _random_probs(25, 4, gen, sharp=1.5)
        a, b = _draw(p, 10, gen), _draw(p, 12, gen)
        rejections += permutation_test(a, b, 4, n_permutations=R, generator=i).p_value < alpha
        if i < 100:
            q = torch.softmax(torch.log(p) + 0.8 * torch.randn(25, 4, generator=gen,
                                                               dtype=torch.float64), 1)
            c = _draw(q, 12, gen)
            rejections_alt += permutation_test(a, c, 4, n_permutations=R,
                                               generator=i).p_value < alpha
    rate = rejections / n_draws
    # Binomial(400, 0.05): sd 0.011; 3 sd either side. The statistic is nearly continuous
    # here (25 points, 4 labels, 22 members), so the test is close to exact, not far
    # below its level (which would mean a bug in the split or the tie counting)
    sd = math.sqrt(alpha * (1 - alpha) / n_draws)
    assert alpha - 3 * sd <= rate <= alpha + 3 * sd, rate
    assert rejections_alt / 100 > 0.8


# ---- Holm -------------------------------------------------------------------------------

@pytest.mark.parametrize("m,seed", [(1, 0), (2, 1), (7, 2), (30, 3), (101, 4)])
def test_holm_matches_step_down_reference(m, seed):
    rng = np.random.default_rng(seed)
    # a mix of tiny, moderate and null-like p-values, with ties
    p = np.concatenate([rng.uniform(0, 0.01, m // 3), rng.uniform(0, 1, m - m // 3)])
    if m > 3:
        p[1] = p[0]
    rng.shuffle(p)
    adjusted = holm(p)
    assert adjusted.shape == p.shape
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)
    for alpha in (0.001, 0.01, 0.05, 0.2):
        assert set(np.flatnonzero(adjusted <= alpha)) == holm_reference(list(p), alpha)
    # adjusted values from the definition, by loops: max over j ≤ i of min(1, (m−j+1)p_(j))
    order = sorted(range(m), key=lambda i: (p[i], i))
    running = 0.0
    for rank, i in enumerate(order, start=1):
        running = max(running, min(1.0, (m - rank + 1) * p[i]))
        assert adjusted[i] == pytest.approx(running, rel=1e-15)


def test_holm_keeps_shape_and_order():
    p = np.array([[0.04, 0.001], [0.5, 0.03]])
    adjusted = holm(p)
    assert adjusted.shape == (2, 2)
    assert adjusted[0, 1] == pytest.approx(0.004)  # smallest: × 4
    assert adjusted[1, 0] == pytest.approx(0.5)    # largest: max(running, 1 × 0.5)


# ---- D² ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m1,m2,P,K,seed", [(2, 2, 3, 2, 0), (5, 3, 8, 4, 1), (7, 9, 5, 6, 2)])
def test_d2_matches_pairwise_reference(m1, m2, P, K, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, K, (m1, P), generator=gen)
    b = torch.randint(0, K, (m2, P), generator=gen)
    # sums of O(P·K) ratios of small integers: float64 rounding only
    assert d2_statistic(a, b, K) == pytest.approx(d2_reference(a, b), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_d2_unbiased_by_simulation(shift):
    """Mean of D̂² over many independent ensemble pairs is the true D² (float64 oracle
    from the probabilities) within 4 standard errors; the plug-in estimator is not."""
    gen = torch.Generator().manual_seed(7)
    P, K, m1, m2, draws = 20, 4, 5, 7, 3000
    p = _random_probs(P, K, gen)
    q = torch.softmax(torch.log(p) + shift * torch.randn(P, K, generator=gen,
                                                         dtype=torch.float64), 1)
    truth = float(((p - q) ** 2).sum(1).mean())
    est, plug = [], []
    for _ in range(draws):
        a, b = _draw(p, m1, gen), _draw(q, m2, gen)
        est.append(d2_statistic(a, b, K))
        pa, pb = label_counts(a, K).double() / m1, label_counts(b, K).double() / m2
        plug.append(float(((pa - pb) ** 2).sum(1).mean()))
    est, plug = np.array(est), np.array(plug)
    se = est.std(ddof=1) / math.sqrt(draws)
    assert abs(est.mean() - truth) <= 4 * se, (est.mean(), truth, se)
    # the plug-in carries the sampling noise Σ p(1−p)/M1 + q(1−q)/M2 (≈ 0.2 here): far
    # outside the same band, so this simulation can tell a biased estimator apart
    assert abs(plug.mean() - truth) > 10 * se


def test_d2_bootstrap_interval_covers_truth():
    """Coverage of the 90 % centred bootstrap interval over seeded repetitions: the
    bootstrap is approximate, so the bound is loose (≥ 80 % of 100 repetitions; a
    Binomial(100, 0.9) falls below 0.8 with probability ~1e-3) — it catches an interval
    off-centre or of the wrong scale, which covers far less."""
    gen = torch.Generator().manual_seed(3)
    P, K, m1, m2 = 60, 3, 16, 20
    p = _random_probs(P, K, gen)
    q = torch.softmax(torch.log(p) + 0.5 * torch.randn(P, K, generator=gen,
                                                       dtype=torch.float64), 1)
    truth = float(((p - q) ** 2).sum(1).mean())
    covered, reps = 0, 100
    for i in range(reps):
        res = d2_bootstrap(_draw(p, m1, gen), _draw(q, m2, gen), K, n_bootstrap=300,
                           level=0.9, generator=i)
        assert res.low <= res.estimate <= res.high
        covered += res.low <= truth <= res.high
    assert covered / reps >= 0.8, covered / reps


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_d2_bootstrap_sd_against_sampling_sd(shift):
    """The bootstrap sd against the sd of D̂² over independent ensemble pairs: accurate
    away from D² = 0; conservative (never smaller) at D² = 0, where the U-statistic is
    degenerate and the member bootstrap is known to overstate the spread."""
    gen = torch.Generator().manual_seed(5)
    P, K, M = 300, 6, 16
    logits = torch.randn(P, K, generator=gen, dtype=torch.float64)
    logits[:, 0] += torch.where(torch.rand(P, generator=gen) < 0.8, 6.0, 1.0)
    p = torch.softmax(logits, 1)
    q = torch.softmax(logits + shift * torch.randn(P, K, generator=gen,
                                                   dtype=torch.float64), 1)
    est, boot = [], []
    for i in range(300):
        a, b = _draw(p, M, gen), _draw(q, M, gen)
        est.append(d2_statistic(a, b, K))
        if i < 30:
            boot.append(d2_bootstrap(a, b, K, n_bootstrap=300, generator=i).std)
    ratio = np.mean(boot) / np.std(est, ddof=1)
    # the sampling sd from 300 draws is known to ±~8 % (1 sd), the mean bootstrap sd of
    # 30 runs to a few %: bands of about ±3 sd
    if shift:
        assert 0.75 <= ratio <= 1.3, ratio
    else:
        assert 0.9 <= ratio <= 3.0, ratio


def test_d2_bootstrap_few_members():
    """With M = 3 a ninth of each ensemble's replicates draws one member three times (no
    pair of distinct members); those are left out and the interval stays finite."""
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randint(0, 3, (3, 40), generator=gen), torch.randint(0, 3, (3, 40), generator=gen)
    res = d2_bootstrap(a, b, 3, n_bootstrap=200, generator=0)
    assert math.isfinite(res.low) and math.isfinite(res.high) and res.std > 0
    assert res.low <= res.estimate <= res.high


def test_d2_bootstrap_interval_scale_shrinks_with_members():
    gen = torch.Generator().manual_seed(4)
    p = _random_probs(40, 5, gen)
    widths = []
    for m in (8, 32, 128):
        res = d2_bootstrap(_draw(p, m, gen), _draw(p, m, gen), 5, n_bootstrap=300,
                           generator=1)
        widths.append(res.high - res.low)
    # under H0 the sd of D̂² falls like 1/M: a 4× larger ensemble, a clearly narrower CI
    assert widths[0] > 2 * widths[1] and widths[1] > 2 * widths[2], widths


def test_equivalence_margin_is_the_smallest_d2_for_the_gap():
    K, gap = 10, 0.02
    margin = equivalence_margin(gap, K)
    gen = torch.Generator().manual_seed(0)
    P = 50
    y = torch.randint(0, K, (P,), generator=gen)
    # the mildest shift: every point loses `gap` on its true label, spread evenly
    p = _random_probs(P, K, gen, sharp=0.5) * 0.9 + 0.1 / K
    q = p.clone()
    q[torch.arange(P), y] -= gap
    q += gap / (K - 1) * (torch.nn.functional.one_hot(y, K) == 0).double()
    assert float(((p - q) ** 2).sum(1).mean()) == pytest.approx(margin, rel=1e-9)
    # any other shift with the same mean accuracy gap has a larger D²
    for _ in range(50):
        d = torch.randn(P, K, generator=gen, dtype=torch.float64)
        d -= d.mean(1, keepdim=True)  # rows sum to 0, like a difference of distributions
        acc_gap = float(d[torch.arange(P), y].mean())
        d *= gap / abs(acc_gap)
        assert float((d ** 2).sum(1).mean()) >= margin * (1 - 1e-12)
    with pytest.raises(ValueError):
        equivalence_margin(0.0, K)
