"""Tests of scaleinv_kernels.ensemble.function_space against direct computations and known
answers.

The ensemble here is a small fake (M linear classifiers, tests/ensemble/nets.py) so these
tests do not depend on the real Ensemble class. The noise-floor tests draw members from
categorical distributions whose expected ℓ1 floor is known exactly:
E Σ_k |p̂_k − q̂_k| = Σ_k E|X_k/a − Y_k/b| with X_k, Y_k independent Binomial(a, p_k),
Binomial(b, p_k) (the marginals of the label counts).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scaleinv_kernels.ensemble import function_space
from scaleinv_kernels.ensemble.function_space import (
    disagreement,
    l1_distance,
    label_distribution,
    noise_floor,
    pairwise_disagreement,
    predict,
)
from tests.ensemble.nets import FakeEnsemble


def _binom_pmf(n: int, p: float) -> torch.Tensor:
    return torch.tensor([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)],
                        dtype=torch.float64)


def exact_floor(protos: torch.Tensor, a: int, b: int) -> float:
    """E[ℓ1] between label shares of independent a- and b-member ensembles, averaged over
    points whose distributions are the rows of ``protos`` (equally often)."""
    xa = torch.arange(a + 1, dtype=torch.float64) / a
    xb = torch.arange(b + 1, dtype=torch.float64) / b
    gap = (xa[:, None] - xb[None, :]).abs()
    total = 0.0
    for p in protos.reshape(-1).tolist():
        total += float((_binom_pmf(a, p)[:, None] * _binom_pmf(b, p)[None, :] * gap).sum())
    return total / protos.shape[0]


def draw(P: torch.Tensor, M: int, g: torch.Generator) -> torch.Tensor:
    """int64 [M, N]: M members, each labelling point n with a draw from P[n]."""
    return torch.multinomial(P, M, replacement=True, generator=g).T.contiguous()


# Prototype label distributions (K = 4): certain, nearly certain, two-way, flat, skewed.
PROTOS = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                       [0.9, 0.1, 0.0, 0.0],
                       [0.5, 0.5, 0.0, 0.0],
                       [0.25, 0.25, 0.25, 0.25],
                       [0.6, 0.2, 0.15, 0.05],
                       [0.1, 0.7, 0.1, 0.1]], dtype=torch.float64)
P_POINTS = PROTOS.repeat_interleave(50, dim=0)  # N = 300 points


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_matches_direct_argmax_in_any_chunking():
    ens = FakeEnsemble(M=5, F=6, K=4, seed=1)
    X = torch.randn(23, 6, generator=torch.Generator().manual_seed(2))
    expected = (torch.einsum("nf,mkf->mnk", X, ens.weight) + ens.bias[:, None]).argmax(-1)
    full = predict(ens, X)
    assert full.dtype == torch.int64 and full.shape == (5, 23) and full.device.type == "cpu"
    assert torch.equal(full, expected)
    ens.calls.clear()
    chunked = predict(ens, X, batch_size=7, member_chunk=2)
    assert torch.equal(chunked, expected)
    # 4 batches (7, 7, 7, 2) × 3 member chunks (2, 2, 1)
    assert [(c[0].start, c[0].stop, c[1]) for c in ens.calls[:3]] == [(0, 2, 7), (2, 4, 7),
                                                                      (4, 5, 7)]
    assert len(ens.calls) == 12 and ens.calls[-1][1] == 2


@pytest.mark.parametrize("was_training", [True, False])
def test_predict_runs_in_eval_no_grad_and_restores_mode(was_training):
    ens = FakeEnsemble(M=3, F=2, K=3)
    ens.train(was_training)
    predict(ens, torch.randn(4, 2))
    assert ens.training is was_training
    assert all(not training and not grad for _, _, training, grad in ens.calls)


def test_predict_restores_mode_on_error_and_checks_output_shape():
    ens = FakeEnsemble(M=3, F=2, K=3).train()
    ens.forward_shared = lambda x, members=None: torch.zeros(2, x.shape[0], 3)  # wrong M
    with pytest.raises(ValueError, match=r"\[members, B, K\] = \[3, 4, K\]"):
        predict(ens, torch.randn(4, 2))
    assert ens.training


def test_predict_validates_input():
    ens = FakeEnsemble(M=2, F=2, K=2)
    with pytest.raises(TypeError, match="n_members"):
        predict(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        predict(ens, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict(ens, torch.randn(3, 2), batch_size=0)
    with pytest.raises(TypeError, match="member_chunk must be an int"):
        predict(ens, torch.randn(3, 2), member_chunk=1.5)
    assert predict(ens, torch.randn(0, 2)).shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# label_distribution, l1_distance


def test_label_distribution_counts_shares():
    preds = torch.tensor([[0, 2, 1], [0, 1, 1], [2, 1, 1], [0, 1, 0]])
    p = label_distribution(preds, num_classes=3)
    expected = torch.tensor([[0.75, 0.0, 0.25], [0.0, 0.75, 0.25], [0.25, 0.75, 0.0]],
                            dtype=torch.float64)
    assert p.dtype == torch.float64 and torch.equal(p, expected)
    assert torch.equal(label_distribution(preds.to(torch.int32), 5)[:, :3], expected)


def test_label_distribution_validates():
    with pytest.raises(TypeError, match="integer labels"):
        label_distribution(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        label_distribution(torch.zeros(3, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"label 3, outside \[0, 3\)"):
        label_distribution(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match="negative label"):
        label_distribution(torch.tensor([[0, -1]]), 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        label_distribution(torch.tensor([[0]]), 0)


def test_l1_distance():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0], [0.25, 0.75], [0.0, 1.0]])
    d = l1_distance(p, q)
    assert d.ndim == 0 and d.dtype == torch.float64 and float(d) == pytest.approx(2.5 / 3)
    assert torch.equal(l1_distance(p, q, per_point=True),
                       torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64))
    assert float(l1_distance(p, p)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        l1_distance(p, q[:2])
    with pytest.raises(TypeError, match="floating"):
        l1_distance(p.long(), q.long())
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        l1_distance(p[0], q[0])


# ---------------------------------------------------------------------------------------------
# noise_floor


@pytest.mark.parametrize(("M", "size"), [(40, 20), (40, 40), (64, 16), (64, 200), (40, (40, 100)),
                                         (20, 20)])
def test_noise_floor_split_matches_exact_expectation(M, size):
    g = torch.Generator().manual_seed(M)
    a, b = (size, size) if isinstance(size, int) else size
    true = exact_floor(PROTOS, a, b)
    est = noise_floor(draw(P_POINTS, M, g), size=size, generator=1)
    # Measured: within 3 % for all cases here; 10 % leaves room and still tests the scaling
    # (without the √ rescaling the (64, 200) case would be off by ≈ 2.5×).
    assert est == pytest.approx(true, rel=0.10), (M, size, est, true)


@pytest.mark.parametrize(("M", "size"), [(40, 20), (64, 64), (40, (40, 100))])
def test_noise_floor_bootstrap_close_to_exact(M, size):
    g = torch.Generator().manual_seed(M + 1)
    a, b = (size, size) if isinstance(size, int) else size
    true = exact_floor(PROTOS, a, b)
    est = noise_floor(draw(P_POINTS, M, g), size=size, method="bootstrap", n_splits=50,
                      generator=2)
    assert est == pytest.approx(true, rel=0.10), (M, size, est, true)


def test_noise_floor_documented_biases():
    g = torch.Generator().manual_seed(7)
    # Few members: bootstrap is biased low (floor of the empirical distribution), split is not.
    true = exact_floor(PROTOS, 10, 10)
    split = [noise_floor(draw(P_POINTS, 10, g), generator=r) for r in range(4)]
    boot = [noise_floor(draw(P_POINTS, 10, g), method="bootstrap", generator=r)
            for r in range(4)]
    assert sum(split) / 4 == pytest.approx(true, rel=0.10)
    assert sum(boot) / 4 < 0.95 * true
    # Rare labels (a·p ≲ 1): their ≈ 2p contribution does not shrink like 1/√a, so rescaling
    # the half-split floor up to larger ensembles understates it, down to smaller overstates.
    rare = torch.tensor([[0.99, 0.01], [0.98, 0.02]], dtype=torch.float64)
    preds = draw(rare.repeat_interleave(200, dim=0), 40, g)
    assert noise_floor(preds, size=200) < 0.95 * exact_floor(rare, 200, 200)
    assert noise_floor(preds, size=10) > 1.05 * exact_floor(rare, 10, 10)


def test_same_distribution_sits_on_the_floor_different_well_above():
    g = torch.Generator().manual_seed(11)
    M = 50
    a, b = draw(P_POINTS, M, g), draw(P_POINTS, M, g)
    floor = noise_floor(a)
    assert floor == pytest.approx(exact_floor(PROTOS, M, M), rel=0.10)
    d_same = float(l1_distance(label_distribution(a, 4), label_distribution(b, 4)))
    assert 0.85 * floor < d_same < 1.15 * floor
    # A modest shift: move 20 % of each point's mass to label 3.
    shifted = 0.8 * P_POINTS + 0.2 * torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    c = draw(shifted, M, g)
    d_diff = float(l1_distance(label_distribution(a, 4), label_distribution(c, 4)))
    assert d_diff > 2.5 * floor


def test_noise_floor_exact_cases_determinism_and_chunking(monkeypatch):
    certain = torch.tensor([[0, 1, 2]] * 6)
    assert noise_floor(certain) == 0.0
    assert noise_floor(certain, method="bootstrap") == 0.0
    # M = 2, size 1: ℓ1 between the two members' one-hot rows, 2·(share of disagreements).
    two = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 3]])
    assert noise_floor(two, size=1) == pytest.approx(2 * 0.25)
    preds = draw(P_POINTS, 30, torch.Generator().manual_seed(5))
    x = noise_floor(preds, size=17)
    assert noise_floor(preds, size=17) == x
    assert noise_floor(preds, size=17, generator=torch.Generator().manual_seed(0)) == x
    monkeypatch.setattr(function_space, "_CHUNK_ELEMENTS", 100)  # many chunks of points
    assert noise_floor(preds, size=17) == pytest.approx(x, rel=1e-12)


def test_noise_floor_validates():
    preds = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="at least 2 members"):
        noise_floor(preds[:1])
    with pytest.raises(ValueError, match="method must be"):
        noise_floor(preds, method="jackknife")
    with pytest.raises(ValueError, match="size must be >= 1"):
        noise_floor(preds, size=0)
    with pytest.raises(ValueError, match="pair"):
        noise_floor(preds, size=(1, 2, 3))
    with pytest.raises(TypeError, match="generator"):
        noise_floor(preds, generator="seed")
    with pytest.raises(TypeError, match="integer labels"):
        noise_floor(preds.float())


# ---------------------------------------------------------------------------------------------
# disagreement


def test_disagreement_modes():
    a = torch.tensor([[0, 1, 2, 3], [0, 1, 1, 1]])
    b = torch.tensor([[0, 1, 2, 0], [1, 1, 1, 1]])
    y = torch.tensor([0, 1, 2, 3])
    d = disagreement(a, b)
    assert d.dtype == torch.float64 and d.ndim == 0 and float(d) == 2 / 8
    assert float(disagreement(a[1], b[1])) == 1 / 4
    assert float(disagreement(a, y)) == 2 / 8  # mean error rate of the members
    assert float(disagreement(y, a)) == 2 / 8
    with pytest.raises(ValueError, match="shapes"):
        disagreement(a, b[:1])
    with pytest.raises(ValueError, match="shapes"):
        disagreement(a, y[:3])


@pytest.mark.parametrize("chunk", [None, 7])
def test_pairwise_disagreement_matches_double_loop(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(function_space, "_CHUNK_ELEMENTS", chunk)
    preds = torch.randint(3, (6, 11), generator=torch.Generator().manual_seed(3))
    D = pairwise_disagreement(preds)
    expected = torch.tensor([[float((preds[i] != preds[j]).double().mean()) for j in range(6)]
                             for i in range(6)], dtype=torch.float64)
    assert D.dtype == torch.float64 and torch.equal(D, expected)
    assert torch.equal(D, D.T) and not D.diagonal().any()
