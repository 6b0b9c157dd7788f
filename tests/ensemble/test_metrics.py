"""Tests of scaleinv_kernels.ensemble.metrics against direct computations and known answers.

The ensemble here is a small fake (M linear classifiers) so these tests do not depend on the
real Ensemble class. The noise-floor tests draw members from categorical distributions whose
expected ℓ1 floor is known exactly: E Σ_k |p̂_k − q̂_k| = Σ_k E|X_k/a − Y_k/b| with X_k, Y_k
independent Binomial(a, p_k), Binomial(b, p_k) (the marginals of the label counts).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scaleinv_kernels.ensemble import metrics
from scaleinv_kernels.ensemble.metrics import (
    average_state_dicts,
    average_weights,
    disagreement,
    flatten_params,
    l1_distance,
    label_distribution,
    noise_floor,
    pairwise_disagreement,
    pairwise_distances,
    predict,
)


class FakeEnsemble(nn.Module):
    """M linear classifiers: weight [M, K, F], bias [M, K]; logits = x @ W_iᵀ + b_i."""

    def __init__(self, M: int, F: int, K: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(M, K, F, generator=g))
        self.bias = nn.Parameter(torch.randn(M, K, generator=g))
        self.calls: list[tuple[slice, int, bool, bool]] = []  # (members, B, training, grad)

    @property
    def n_members(self) -> int:
        return self.weight.shape[0]

    def _sel(self, members: slice | None) -> slice:
        return slice(None) if members is None else members

    def forward(self, x: torch.Tensor, members: slice | None = None) -> torch.Tensor:
        s = self._sel(members)
        return torch.einsum("mbf,mkf->mbk", x, self.weight[s]) + self.bias[s][:, None]

    def forward_shared(self, x: torch.Tensor, members: slice | None = None) -> torch.Tensor:
        s = self._sel(members)
        self.calls.append((s, x.shape[0], self.training, torch.is_grad_enabled()))
        return torch.einsum("bf,mkf->mbk", x, self.weight[s]) + self.bias[s][:, None]

    def member(self, i: int) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[2], self.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(self.weight[i])
            lin.bias.copy_(self.bias[i])
        return lin


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
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 100)  # many chunks of points
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
        monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk)
    preds = torch.randint(3, (6, 11), generator=torch.Generator().manual_seed(3))
    D = pairwise_disagreement(preds)
    expected = torch.tensor([[float((preds[i] != preds[j]).double().mean()) for j in range(6)]
                             for i in range(6)], dtype=torch.float64)
    assert D.dtype == torch.float64 and torch.equal(D, expected)
    assert torch.equal(D, D.T) and not D.diagonal().any()


# ---------------------------------------------------------------------------------------------
# average_weights


def _bn_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def test_average_of_identical_models_is_that_model():
    net = _bn_net(0)
    net(torch.randn(8, 5))  # non-trivial running stats, num_batches_tracked = 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    avg = average_weights([net, net])
    assert avg is not net and avg[0] is not net[0]
    for k, v in net.state_dict().items():
        assert torch.equal(avg.state_dict()[k], v), k
        assert torch.equal(v, before[k]), k  # input untouched


def test_average_weights_is_the_mean_and_ints_come_from_the_first():
    nets = [_bn_net(s) for s in range(3)]
    nets[1][1].num_batches_tracked.fill_(5)
    avg = average_weights(nets)
    for k, v in avg.state_dict().items():
        stacked = torch.stack([n.state_dict()[k] for n in nets])
        if k.endswith("num_batches_tracked"):
            assert int(v) == 0
        else:
            assert torch.equal(v, stacked.double().mean(0).float()), k
    # state_dicts need a template; a mix of modules and state_dicts copies the first module
    sds = [n.state_dict() for n in nets]
    from_sds = average_weights(sds, template=_bn_net(9))
    mixed = average_weights([sds[0], nets[1], sds[2]])
    for k, v in avg.state_dict().items():
        assert torch.equal(from_sds.state_dict()[k], v) and torch.equal(mixed.state_dict()[k], v)
    assert average_state_dicts(sds).keys() == avg.state_dict().keys()


def test_average_weights_of_an_ensemble():
    ens = FakeEnsemble(M=4, F=3, K=2, seed=4)
    avg = average_weights(ens)
    assert isinstance(avg, nn.Linear)
    torch.testing.assert_close(avg.weight, ens.weight.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(avg.bias, ens.bias.mean(0), rtol=1e-6, atol=0)


def test_average_weights_recomputes_batchnorm_statistics():
    nets = [_bn_net(s) for s in range(2)]
    nets[0].eval()
    X = torch.randn(60, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1
    avg = average_weights(nets, data=X, batch_size=20)
    bn = avg[1]
    with torch.no_grad():
        h = avg[0](X)  # the BN layer's input under the averaged weights
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-5, atol=1e-6)
    per_batch_var = torch.stack([c.var(0) for c in h.split(20)]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    assert not avg.training and bn.momentum == 0.1  # mode and momentum restored
    # an iterable of (x, y) batches is equivalent
    loader = [(x, torch.zeros(len(x))) for x in X.split(20)]
    again = average_weights(nets, data=loader)
    assert torch.equal(again[1].running_mean, bn.running_mean)
    assert torch.equal(again[1].running_var, bn.running_var)


def test_average_weights_validates():
    a, b = _bn_net(0), nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="different keys"):
        average_weights([a, b])
    with pytest.raises(ValueError, match="average_weights: entry 'weight' of item 1"):
        average_weights([nn.Linear(5, 4), nn.Linear(6, 4)])
    with pytest.raises(TypeError, match="template"):
        average_weights([a.state_dict()])
    with pytest.raises(TypeError, match="single Sequential"):
        average_weights(a)
    with pytest.raises(ValueError, match="empty"):
        average_weights([])
    with pytest.raises(TypeError, match="item 1 must be an nn.Module or a state_dict"):
        average_weights([a, 3])
    with pytest.raises(ValueError, match="no batches"):
        average_weights([a], data=[])
    with pytest.raises(ValueError, match="non-empty"):
        average_weights([a], data=torch.zeros(0, 5))
    with pytest.raises(ValueError, match="does not match"):
        average_weights([b.state_dict()], template=a)


# ---------------------------------------------------------------------------------------------
# flatten_params, pairwise_distances


def _double_loop(vectors: list[torch.Tensor]) -> torch.Tensor:
    T = len(vectors)
    return torch.tensor([[float((vectors[i].double() - vectors[j].double()).norm())
                          for j in range(T)] for i in range(T)], dtype=torch.float64)


def test_pairwise_distances_matches_double_loop_for_every_input_kind():
    nets = [_bn_net(s) for s in range(4)]
    vecs = [torch.cat([p.detach().reshape(-1) for p in n.parameters()]) for n in nets]
    expected = _double_loop(vecs)
    for snaps in (nets, [n.state_dict() for n in nets], vecs, torch.stack(vecs)):
        D = pairwise_distances(snaps)
        assert D.dtype == torch.float64 and D.shape == (4, 4)
        torch.testing.assert_close(D, expected, rtol=1e-12, atol=0)
        assert torch.equal(D, D.T) and not D.diagonal().any()


def test_pairwise_distances_is_accurate_for_nearby_snapshots():
    # ‖w‖ ≈ 3e4, distances ≈ 1e-5: the Gram trick would lose every digit in float64.
    g = torch.Generator().manual_seed(0)
    base = 1e3 + torch.randn(1000, dtype=torch.float64, generator=g)
    snaps = torch.stack([base + 1e-6 * torch.randn(1000, dtype=torch.float64, generator=g)
                         for _ in range(5)])
    expected = _double_loop(list(snaps))
    torch.testing.assert_close(pairwise_distances(snaps), expected, rtol=1e-9, atol=0)


def test_batchnorm_statistics_are_not_weights():
    a, b = _bn_net(0), _bn_net(0)
    b(torch.randn(8, 5))  # only b's running statistics change
    assert not pairwise_distances([a, b]).any()
    assert not pairwise_distances([a.state_dict(), b.state_dict()]).any()
    D = pairwise_distances([a.state_dict(), b.state_dict()], keys=["1.running_mean"])
    expected = float((a[1].running_mean - b[1].running_mean).double().norm())
    assert float(D[0, 1]) == pytest.approx(expected, rel=1e-12) and expected > 0


def test_flatten_params():
    net = _bn_net(1)
    v = flatten_params(net)
    assert v.dtype == torch.float64
    assert torch.equal(v, torch.cat([p.detach().reshape(-1).double() for p in net.parameters()]))
    assert torch.equal(flatten_params(net.state_dict()), v)  # BN stats excluded, same order
    w = flatten_params(net, keys=["3.bias", "0.bias"])
    assert torch.equal(w, torch.cat([net[3].bias, net[0].bias]).detach().double())
    with pytest.raises(ValueError, match="no parameter named"):
        flatten_params(net, keys=["1.running_mean"])


def test_pairwise_distances_validates():
    with pytest.raises(ValueError, match="no snapshots"):
        pairwise_distances([])
    with pytest.raises(ValueError, match="snapshot 1 has 3 entries"):
        pairwise_distances([torch.zeros(4), torch.zeros(3)])
    with pytest.raises(TypeError, match="do not mix"):
        pairwise_distances([torch.zeros(4), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="different weights"):
        pairwise_distances([nn.Linear(2, 2), nn.Linear(2, 2, bias=False)])
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        pairwise_distances(torch.zeros(3))
