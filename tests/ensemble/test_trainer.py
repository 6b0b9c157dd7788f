"""EnsembleTrainer: per-member data order, gradients equal single-model training, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from tests.ensemble.nets import BNMLP
from tests.helpers import assert_bitwise, assert_rel


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 5, generator=g), torch.randint(0, 5, (n,), generator=g)


def make(m=3, chunk=None, lr=0.1, wd=1e-2, seed=0):
    ens = Ensemble(BNMLP, m, init="shared", seed=1)
    opt = FusedSGDWD(ens.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    return ens, opt, EnsembleTrainer(ens, opt, data(), 16, seed=seed, chunk_size=chunk,
                                     progress=False)


@pytest.mark.parametrize("per_member", [False, True], ids=["scalar-hparams", "per-member"])
def test_each_member_trains_like_a_single_model(per_member):
    ens, opt, trainer = make()
    members = [ens.member(i) for i in range(3)]
    lrs, wds = [0.1, 0.05, 0.2], [1e-2, 0.0, 3e-2]
    if per_member:  # three schedules in one process
        trainer.fit(2, schedule=lambda e: (torch.tensor(lrs), torch.tensor(wds)))
    else:
        lrs, wds = [0.1] * 3, [1e-2] * 3
        trainer.fit(2)
    X, Y = data()
    for i, model in enumerate(members):
        sgd = torch.optim.SGD(model.parameters(), lr=lrs[i], momentum=0.9,
                              weight_decay=wds[i], foreach=False)
        for epoch in range(2):
            perm = trainer.permutations(epoch, [i])[0]
            for s in range(math.ceil(len(X) / 16)):
                idx = perm[s * 16:(s + 1) * 16]
                sgd.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                sgd.step()
        for name, p in model.named_parameters():
            q = dict(ens.net.named_parameters())[name][i]
            # 6 full-batch steps; rounding differs only in summation order
            assert_rel(q, p, 1e-5, f"member {i} {name}", atol=1e-5 * float(p.detach().abs().max()))
        for name, b in model.named_buffers():
            q = dict(ens.net.named_buffers())[name][i]
            assert_rel(q.double(), b.double(), 1e-4, f"member {i} {name}",
                       atol=1e-4 * float(b.abs().max()))


def test_members_see_different_orders_independent_of_m():
    _, _, t3 = make(m=3)
    _, _, t5 = make(m=5)
    p3, p5 = t3.permutations(0), t5.permutations(0)
    assert torch.equal(p3, p5[:3])
    assert not torch.equal(p3[0], p3[1])
    assert not torch.equal(t3.permutations(1), p3)
    assert all(torch.equal(row.sort().values, torch.arange(48)) for row in p5)


def test_chunked_training_matches_unchunked():
    ens_a, _, ta = make(m=4)
    ens_b, _, tb = make(m=4, chunk=3)
    la = ta.fit(1)[0]["train_loss"]
    lb = tb.fit(1)[0]["train_loss"]
    assert_rel(lb, la, 1e-5, "loss", atol=1e-6)
    for (n, p), (_, q) in zip(ens_a.named_parameters(), ens_b.named_parameters()):
        assert_rel(q, p, 1e-5, n, atol=1e-5 * float(p.detach().abs().max()))


def test_resume_is_bitwise():
    ens_a, _, ta = make()
    ta.fit(3, schedule=lambda e: (0.1 / (1 + e), 1e-2))
    ens_b, _, tb = make()
    tb.fit(1, schedule=lambda e: (0.1 / (1 + e), 1e-2))
    state = tb.state_dict()
    ens_c, _, tc = make()
    tc.load_state_dict(state)
    tc.fit(2, schedule=lambda e: (0.1 / (1 + e), 1e-2))
    for (n, p), (_, q) in zip(ens_a.state_dict().items(), ens_c.state_dict().items()):
        assert_bitwise(q, p, n)
    assert [r["epoch"] for r in tc.history] == [0, 1, 2]
    assert tc.history[2]["lr"] == pytest.approx(0.1 / 3)


def test_schedule_callbacks_and_accuracy():
    ens, opt, trainer = make()
    seen = []
    records = trainer.fit(2, schedule=lambda e: (0.05 * (e + 1), 0.0),
                          callbacks=[lambda t, e: seen.append(e) or {"acc": t.accuracy(*data())}])
    assert seen == [0, 1]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert records[1]["acc"].shape == (3,) and records[1]["acc"].dtype == torch.float64
    assert records[0]["train_loss"].shape == (3,)


def test_trainer_bad_input():
    ens = Ensemble(BNMLP, 2)
    opt = FusedSGDWD(ens.parameters(), lr=0.1)
    X, Y = data()
    with pytest.raises(ValueError, match="X has 48 samples but Y has 47"):
        EnsembleTrainer(ens, opt, (X, Y[:47]), 8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        EnsembleTrainer(ens, opt, (X, Y), 0)
    with pytest.raises(ValueError, match="not the ensemble's"):
        EnsembleTrainer(ens, FusedSGDWD(BNMLP().parameters(), lr=0.1), (X, Y), 8)
    with pytest.raises(TypeError, match="must be an Ensemble"):
        EnsembleTrainer(BNMLP(), opt, (X, Y), 8)
