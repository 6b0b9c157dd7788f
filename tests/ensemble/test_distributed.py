"""Member sharding: member_range, member_offset, and gathering/slicing trainer states.

The collectives run on a fake all_gather: one thread per simulated rank, exchanging
tensors through shared slots (the real gloo path is tested end to end in
tests/experiments/test_distributed.py).
"""

from __future__ import annotations

import threading

import pytest
import torch

from scaleinv_kernels import FusedSGDWD
from scaleinv_kernels.ensemble import Ensemble, EnsembleTrainer
from scaleinv_kernels.ensemble import distributed as D
from tests.ensemble.nets import BNMLP
from tests.helpers import assert_bitwise


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 5, generator=g), torch.randint(0, 5, (n,), generator=g)


def make(members: range, lr_all: torch.Tensor):
    """A trainer for the global members ``members`` of an ensemble with per-member lr."""
    ens = Ensemble(BNMLP, len(members), init="independent", seed=3,
                   member_offset=members.start)
    opt = FusedSGDWD(ens.parameters(), lr=lr_all[members.start:members.stop].clone(),
                     momentum=0.9, weight_decay=1e-2)
    trainer = EnsembleTrainer(ens, opt, data(), 16, seed=5, progress=False,
                              member_offset=members.start)
    return trainer


# ---- member_range -----------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(1, 1), (5, 2), (24, 5), (7, 7), (10, 3), (3, 1)])
def test_member_range_covers_in_contiguous_balanced_blocks(n, world):
    blocks = [D.member_range(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert sizes == [n // world + (r < n % world) for r in range(world)]
    assert min(sizes) >= 1 and all(b.step == 1 for b in blocks)


def test_member_range_errors():
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        D.member_range(3, 0, 4)
    with pytest.raises(ValueError, match="rank must be"):
        D.member_range(8, 2, 2)
    with pytest.raises(ValueError, match="n_members must be a positive int"):
        D.member_range(0, 0, 1)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        D.member_range(4, 0, True)


# ---- member_offset ----------------------------------------------------------------------
def test_member_offset_gives_the_members_of_the_unsplit_ensemble():
    lr = torch.linspace(0.05, 0.3, 5, dtype=torch.float64)
    full = make(range(0, 5), lr)
    parts = [make(range(0, 3), lr), make(range(3, 5), lr)]
    # same initial weights (init="independent") and same data orders
    for k, v in full.ens.state_dict().items():
        assert_bitwise(torch.cat([p.ens.state_dict()[k] for p in parts]), v, k)
    assert_bitwise(torch.cat([p.permutations(1) for p in parts]), full.permutations(1))
    # and the same training trajectory, bit for bit
    losses = [t.fit(2)[-1]["train_loss"] for t in (full, *parts)]
    assert_bitwise(torch.cat(losses[1:]), losses[0], "train_loss")
    for k, v in full.ens.state_dict().items():
        assert_bitwise(torch.cat([p.ens.state_dict()[k] for p in parts]), v, k)
    assert "member_offset=3" in repr(parts[1].ens)


def test_member_offset_rejects_bad_values():
    with pytest.raises(ValueError, match="member_offset must be an int >= 0"):
        Ensemble(BNMLP, 2, member_offset=-1)
    ens = Ensemble(BNMLP, 2)
    opt = FusedSGDWD(ens.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="member_offset must be an int >= 0"):
        EnsembleTrainer(ens, opt, data(), 16, member_offset=1.5, progress=False)


# ---- gathering with one process and with a fake group -----------------------------------
def test_single_process_gather_is_the_identity():
    info = D.DistInfo()
    x = torch.arange(6.0).view(3, 2)
    assert D.gather_members(x, info) is x
    state = make(range(0, 3), torch.full((3,), 0.1, dtype=torch.float64)).state_dict()
    assert D.gather_trainer_state(state, info)["ensemble"] is state["ensemble"]
    with pytest.raises(TypeError, match="member dim"):
        D.gather_members(torch.tensor(1.0), info)


def _fake_group(monkeypatch, world: int):
    """Replace the all_gather primitive by a thread exchange between ``world`` ranks; each
    thread sets ``local.rank`` first."""
    barrier = threading.Barrier(world, timeout=30)
    slots: list = [None] * world
    local = threading.local()

    def all_gather(out, tensor):
        slots[local.rank] = tensor.clone()
        barrier.wait()
        for r, o in enumerate(out):
            assert o.shape == slots[r].shape, "all_gather needs equal shapes on every rank"
            o.copy_(slots[r])
        barrier.wait()  # nobody overwrites a slot before everyone has read it

    monkeypatch.setattr(D, "_all_gather", all_gather)
    return local


def _run_ranks(local, world: int, fn):
    results, errors = [None] * world, []

    def body(r):
        local.rank = r
        try:
            results[r] = fn(r)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_gather_uneven_blocks_with_a_fake_group(monkeypatch):
    world, n = 3, 7  # blocks of 3, 2, 2: padding is needed
    local = _fake_group(monkeypatch, world)
    full = torch.arange(n * 2, dtype=torch.float32).view(n, 2)

    def rank_fn(r):
        mine = D.member_range(n, r, world)
        info = D.DistInfo(rank=r, world_size=world, is_main=r == 0)
        return D.gather_members(full[mine.start:mine.stop], info)

    for got in _run_ranks(local, world, rank_fn):
        assert_bitwise(got, full)


def test_trainer_state_gather_and_slice_round_trip(monkeypatch):
    """A state sharded over 2 ranks gathers into the unsplit trainer's state; slicing the
    full state for another split and loading it continues exactly like the unsplit run."""
    lr = torch.linspace(0.05, 0.3, 5, dtype=torch.float64)
    full = make(range(0, 5), lr)
    full.fit(2)
    world = 2
    shards = [make(D.member_range(5, r, world), lr) for r in range(world)]
    for t in shards:
        t.fit(2)
    local = _fake_group(monkeypatch, world)

    def rank_fn(r):
        info = D.DistInfo(rank=r, world_size=world, is_main=r == 0)
        return D.gather_trainer_state(shards[r].state_dict(), info)

    gathered = _run_ranks(local, world, rank_fn)
    want = full.state_dict()
    for got in gathered:
        assert got["epoch"] == 2 and got["seed"] == want["seed"]
        for k, v in want["ensemble"].items():
            assert_bitwise(got["ensemble"][k], v, k)
        assert got["ensemble"]._metadata == want["ensemble"]._metadata
        for i, s in want["optimizer"]["state"].items():
            assert_bitwise(got["optimizer"]["state"][i]["momentum_buffer"],
                           s["momentum_buffer"], f"momentum {i}")
        assert_bitwise(got["optimizer"]["param_groups"][0]["lr"],
                       want["optimizer"]["param_groups"][0]["lr"])
        for a, b in zip(got["history"], want["history"]):
            assert_bitwise(a["train_loss"], b["train_loss"])
            assert_bitwise(a["lr"], b["lr"])

    # resume the full state with a 3-way split (different from the 2-way that wrote it)
    resumed = []
    for r in range(3):
        mine = D.member_range(5, r, 3)
        t = make(mine, lr)
        t.load_state_dict(D.slice_trainer_state(gathered[0], mine))
        assert len(t.history) == 2 and t.history[0]["train_loss"].shape == (len(mine),)
        resumed.append(t.fit(1)[0]["train_loss"])
    assert_bitwise(torch.cat(resumed), full.fit(1)[0]["train_loss"])


def test_slice_trainer_state_errors():
    state = make(range(0, 3), torch.full((3,), 0.1, dtype=torch.float64)).state_dict()
    with pytest.raises(ValueError, match="holds a tensor of 3 members"):
        D.slice_trainer_state(state, range(2, 4))
    with pytest.raises(ValueError, match="non-empty range with step 1"):
        D.slice_trainer_state(state, range(0, 3, 2))
    with pytest.raises(TypeError, match="EnsembleTrainer.state_dict"):
        D.slice_trainer_state({"epoch": 1}, range(0, 1))


def test_a_failed_collective_names_the_rank_and_the_timeout(monkeypatch):
    def timed_out(out, tensor):
        raise RuntimeError("Timed out waiting 5000ms for send operation to complete")

    monkeypatch.setattr(D, "_all_gather", timed_out)
    monkeypatch.setenv(D.TIMEOUT_ENV, "5")
    info = D.DistInfo(rank=1, world_size=2, is_main=False)
    with pytest.raises(RuntimeError, match=r"rank 1/2: gather_members \(counts\) failed .*"
                                           r"another rank has probably died.*"
                                           r"SCALEINV_DIST_TIMEOUT=5 s"):
        D.gather_members(torch.zeros(2, 3), info)


def test_timeout_env(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.dist_timeout_s() == 120.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "7.5")
    assert D.dist_timeout_s() == 7.5
    for bad in ("abc", "0", "-3"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
            D.dist_timeout_s()


def test_init_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_distributed("cpu")
    assert info == D.DistInfo(rank=0, world_size=1, is_main=True, device=torch.device("cpu"))
    assert not info.distributed and not torch.distributed.is_initialized()


def test_close_meets_at_a_barrier_only_after_a_finished_run(monkeypatch):
    """After a full run every rank waits at a barrier before destroying its group; after a
    failure it leaves at once (a barrier would only wait for the others' timeout); one
    process does nothing."""
    calls = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: calls.append("destroy"))
    two = D.DistInfo(rank=1, world_size=2, is_main=False)
    D.close_distributed(two)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.close_distributed(two, synchronize=False)
    assert calls == ["destroy"]
    calls.clear()
    D.close_distributed(D.DistInfo())
    assert calls == []
