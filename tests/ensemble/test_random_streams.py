"""Per-member random streams: a member's dropout masks depend on (seed, its global index,
its count of random passes, the layer) only, not on the members beside it, the chunk
order, ``members=`` slices or sharding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble.random import member_generator
from tests.helpers import assert_bitwise, assert_rel

M, B = 4, 6


def dropout_net() -> nn.Module:
    """Every kind of dropout the converter allows, between member layers."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Dropout2d(0.25), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 16), nn.Dropout(0.5), nn.SELU(), nn.AlphaDropout(0.2),
        nn.Linear(16, 3))


def _runs(layout: list[tuple[int, int, int]], x: torch.Tensor, monkeypatch,
          passes: int = 2):
    """Per (pass, global member): the masks its dropout layers drew, its output and its
    input gradient, each member run by the ensemble and member slice ``layout`` gives:
    entries (first global member, stop, ensemble) in call order; an ensemble holds the
    members from its first to its last entry (member_offset = its first member)."""
    from scaleinv_kernels.ensemble import random as member_random

    drawn = []
    real = member_random.member_bernoulli

    def recording(ctx, keep, shape, device, dtype):
        mask = real(ctx, keep, shape, device, dtype)
        drawn.append(mask.view(shape[0], ctx.m, *shape[1:]).transpose(0, 1))
        return mask

    monkeypatch.setattr(member_random, "member_bernoulli", recording)
    spans = {}
    for start, stop, e in layout:
        a, b = spans.get(e, (start, stop))
        spans[e] = (min(a, start), max(b, stop))
    ensembles = {e: Ensemble(dropout_net, b - a, init="independent", seed=5, member_offset=a)
                 for e, (a, b) in spans.items()}
    masks, outs, grads = {}, {}, {}
    for s in range(passes):
        for start, stop, e in layout:
            ens = ensembles[e]
            drawn.clear()
            xi = x[s, start:stop].clone().requires_grad_()
            out = ens(xi, members=slice(start - ens.member_offset, stop - ens.member_offset))
            out.square().sum().backward()
            for g in range(start, stop):
                masks[s, g] = [d[g - start] for d in drawn]
                outs[s, g] = out[g - start].detach()
                grads[s, g] = xi.grad[g - start]
    return masks, outs, grads


@pytest.mark.parametrize("layout", [
    [(2, 4, 0), (0, 2, 0)],  # members= slices of one ensemble, in reverse order
    [(0, 1, 0), (1, 4, 0)],  # uneven chunks
    [(0, 2, 0), (2, 4, 1)],  # two shards (member_offset 0 and 2)
    [(3, 4, 3), (0, 1, 0), (2, 3, 2), (1, 2, 1)],  # one member per ensemble
], ids=["slices-reversed", "uneven-chunks", "shards", "singles"])
def test_masks_independent_of_chunking_slices_and_sharding(layout, monkeypatch):
    """Over two random passes (so the pass count matters too), every member's masks are
    bitwise those of running all members in one call; outputs and input gradients agree
    to 1e-5 of their scale (convolutions and GEMMs over a different number of members may
    round differently; a different mask would change them by O(1))."""
    x = torch.randn(2, M, B, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    ref_masks, ref_out, ref_grad = _runs([(0, M, 0)], x, monkeypatch)
    masks, outs, grads = _runs(layout, x, monkeypatch)
    for key in ref_out:
        assert len(masks[key]) == 3
        for k, (got, want) in enumerate(zip(masks[key], ref_masks[key])):
            assert_bitwise(got, want, f"pass/member {key} mask of dropout {k}")
        for got, want, what in ((outs, ref_out, "output"), (grads, ref_grad, "input grad")):
            assert_rel(got[key], want[key], 0.0, f"pass/member {key} {what}",
                       atol=1e-5 * float(want[key].abs().max()))
    # masks change from pass to pass and from member to member
    assert not torch.equal(ref_masks[0, 0][1], ref_masks[1, 0][1])
    assert not torch.equal(ref_masks[0, 0][1], ref_masks[0, 1][1])


def test_dropout_equals_member_loop_with_the_members_own_masks():
    """Member g's mask in pass s of the k-th dropout call is Bernoulli(1 - p) from
    member_generator(seed, g, s, k): the member loop with those masks gives the ensemble's
    output (masks bitwise, values to 1e-6 of the largest: the linear layers differ in
    summation order only)."""
    p, seed = 0.3, 11

    def net():
        return nn.Sequential(nn.Linear(8, 32), nn.Dropout(p), nn.Linear(32, 16),
                             nn.Dropout(p))

    ens = Ensemble(net, 3, init="independent", seed=seed, member_offset=7)
    members = [ens.member(i) for i in range(3)]
    x = torch.randn(3, 2, 5, 8, generator=torch.Generator().manual_seed(1))
    for s in range(2):
        out = ens(x[:, s])
        for i, mod in enumerate(members):
            h = mod[0](x[i, s])
            for k, lin in ((0, None), (1, mod[2])):
                if lin is not None:
                    h = lin(h)
                keep = torch.empty(h.shape).bernoulli_(1 - p, generator=member_generator(
                    seed, 7 + i, s, k))
                h = h * keep / (1 - p)
            assert torch.equal(out[i] == 0, h == 0), f"member {i} pass {s}: mask"
            assert_rel(out[i], h, 0.0, f"member {i} pass {s}",
                       atol=1e-6 * float(h.detach().abs().max()))
    assert ens.random_step.tolist() == [2, 2, 2]


def test_dropout_rate_members_differ_and_eval_is_identity():
    ens = Ensemble(lambda: nn.Sequential(nn.Dropout(0.5)), 4, seed=0)
    x = torch.ones(4, 64, 64)
    out = ens(x)
    zero = out == 0
    n = zero.numel()
    # 16 384 independent Bernoulli(0.5) draws: 5 standard deviations is 0.0195
    assert abs(zero.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert not any(torch.equal(zero[i], zero[j]) for i in range(4) for j in range(i))
    shared = ens.forward_shared(torch.ones(64, 64))  # one batch, still one mask per member
    assert not torch.equal(shared[0] == 0, shared[1] == 0)
    assert ens.random_step.tolist() == [2, 2, 2, 2]
    ens.eval()
    assert torch.equal(ens(x), x)
    assert ens.random_step.tolist() == [2, 2, 2, 2]  # eval passes draw nothing


def test_random_step_is_state_kept_on_cpu_and_optional():
    ens = Ensemble(dropout_net, 2, seed=0)
    assert "random_step" in ens.state_dict() and ens.random_step.device.type == "cpu"
    ens.double()
    assert ens.random_step.dtype == torch.int64 and ens.random_step.device.type == "cpu"
    state = {k: v for k, v in ens.state_dict().items() if k != "random_step"}
    ens.load_state_dict(state)  # a checkpoint from before the counts: accepted
    plain = Ensemble(lambda: nn.Sequential(nn.Linear(3, 2)), 2)
    assert "random_step" not in plain.state_dict()


def _train(chunk: int | None, epochs: int = 1, state=None):
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 2, 5, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    ens = Ensemble(dropout_net, M, init="independent", seed=2)
    opt = FusedSGDWD(ens.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    trainer = EnsembleTrainer(ens, opt, (X, Y), 8, seed=1, chunk_size=chunk, progress=False)
    if state is not None:
        trainer.load_state_dict(state)
    trainer.fit(epochs)
    return ens, trainer


def test_trainer_trajectory_independent_of_chunking_and_resumed_bitwise():
    """With dropout, chunked training follows the unchunked trajectory (1e-5: different
    masks would differ by O(1)) and a resumed run continues bit for bit (the pass counts
    are in the checkpoint)."""
    full, _ = _train(None)
    chunked, _ = _train(3)
    for (n, p), (_, q) in zip(full.named_parameters(), chunked.named_parameters()):
        assert_rel(q, p, 1e-5, n, atol=1e-5 * float(p.detach().abs().max()))
    two, _ = _train(None, epochs=2)
    _, first = _train(None, epochs=1)
    resumed, _ = _train(None, epochs=1, state=first.state_dict())
    for (n, p), (_, q) in zip(two.state_dict().items(), resumed.state_dict().items()):
        assert_bitwise(q, p, n)
    assert two.random_step.tolist() == [10, 10, 10, 10]  # 2 epochs of 5 steps


def test_feature_dropout_needs_batched_input():
    ens = Ensemble(lambda: nn.Sequential(nn.Dropout2d(0.5)), 2)
    with pytest.raises(ValueError, match="Dropout2d: the ensemble needs batched 4-d input"):
        ens(torch.randn(2, 3, 4, 5))
    assert F.dropout is not None  # functional dropout is refused: see test_forward_check
