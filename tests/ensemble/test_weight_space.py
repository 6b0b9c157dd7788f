"""Tests of scaleinv_kernels.ensemble.weight_space against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleinv_kernels.ensemble.weight_space import (
    average_state_dicts,
    average_weights,
    flatten_params,
    pairwise_distances,
)
from tests.ensemble.nets import FakeEnsemble

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
