"""Ensemble members sharded over processes (torch.distributed, launched by torchrun).

An ensemble of ``n`` members is split into contiguous blocks, one per rank
(:func:`member_range`); every rank trains its block as an ordinary :class:`~.Ensemble`
built with ``member_offset`` = the block's first global index, so the members' seeds (init,
data order) and hence their trajectories are exactly those of the unsplit ensemble. There is
no gradient communication at all: members are independent, only results are collected.

* :func:`init_distributed` joins the process group torchrun describes in the environment
  (or returns a single-process :class:`DistInfo` without one).
* :func:`gather_members` concatenates the ranks' ``[m_r, ...]`` tensors into ``[n, ...]``,
  on EVERY rank (an ``all_gather``: the same call on every rank, no rank-dependent branch,
  and with NCCL a ``gather`` to one rank would not be cheaper).
* :func:`gather_trainer_state` / :func:`slice_trainer_state` turn a rank's
  :meth:`EnsembleTrainer.state_dict` into the full one and back, so a checkpoint always
  holds every member and can be resumed with any world size.

Collectives fail after ``SCALEINV_DIST_TIMEOUT`` seconds (default 120) instead of hanging
when a rank has died.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_ENV = "SCALEINV_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``; ``is_main`` for rank
    0 (the only one that writes files); ``device`` the device this rank computes on (with
    CUDA and several ranks per node: ``cuda:LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    is_main: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.world_size > 1


def member_range(n_members: int, rank: int, world_size: int) -> range:
    """Global indices of the members ``rank`` holds: contiguous blocks in rank order, the
    first ``n_members % world_size`` ranks one member more than the others.

    Raises ValueError for non-positive counts, a rank outside ``[0, world_size)``, or
    ``n_members < world_size`` (a rank would hold no member).
    """
    for name, v in (("n_members", n_members), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"member_range: {name} must be a positive int, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"member_range: rank must be an int in [0, {world_size}), got {rank!r}")
    if n_members < world_size:
        raise ValueError(f"member_range: {n_members} members cannot be split over "
                         f"{world_size} processes (every rank needs at least one); use at "
                         f"most {n_members} processes")
    base, extra = divmod(n_members, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def dist_timeout_s() -> float:
    """The collective timeout in seconds: env ``SCALEINV_DIST_TIMEOUT`` or 120."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def init_distributed(device: torch.device | str) -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1):
    backend gloo for a CPU ``device``, nccl for CUDA (each rank then uses
    ``cuda:LOCAL_RANK`` unless ``device`` names an index), timeout from
    :func:`dist_timeout_s`. Without ``WORLD_SIZE`` (or with 1): a single-process
    :class:`DistInfo` and no process group. An already initialised group is reused."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"init_distributed: device type {device.type!r} is not supported "
                         "(cpu → gloo, cuda → nccl)")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=dist_timeout_s()))
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, is_main=rank == 0, device=device)


def close_distributed(info: DistInfo, *, synchronize: bool = True) -> None:
    """Leave the process group (no-op for a single process).

    With ``synchronize`` (the run finished on this rank) every rank first meets at a
    barrier, so that none tears its group down while another still finishes its last
    collectives: without it a gloo rank sometimes aborted at the end of a successful run
    ("terminate called without an active exception", in the 2- and 3-process tests on a
    loaded machine). With it such aborts are much rarer but still possible: the barrier
    narrows a teardown race inside torch's gloo backend rather than removing it. After a
    failure (``synchronize=False``) there is no barrier: it would only wait for the other
    ranks' timeout."""
    if info.distributed and dist.is_initialized():
        if synchronize:
            _collective("the closing barrier", info, dist.barrier)
        dist.destroy_process_group()


def _all_gather(out: list[Tensor], tensor: Tensor) -> None:
    # the one communication primitive (tests replace it with a fake)
    dist.all_gather(out, tensor)


def _collective(what: str, info: DistInfo, fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError as e:  # gloo/nccl timeouts and closed connections
        raise RuntimeError(
            f"rank {info.rank}/{info.world_size}: {what} failed ({e}); another rank has "
            f"probably died or is stuck (collectives time out after {TIMEOUT_ENV}="
            f"{dist_timeout_s():g} s)") from e


def gather_members(local: Tensor, info: DistInfo) -> Tensor:
    """Concatenate every rank's ``local`` ``[m_r, ...]`` along dim 0 in rank order:
    ``[Σ m_r, ...]``, returned on every rank, on ``local``'s device.

    ``m_r`` may differ between ranks (blocks of :func:`member_range` differ by one); the
    other dims and the dtype must agree. With one process ``local`` itself is returned.
    Every rank must call it (it is a collective).
    """
    if not isinstance(local, Tensor) or local.dim() < 1:
        raise TypeError("gather_members: local must be a tensor [m, ...] with a member dim")
    if not info.distributed:
        return local
    comm = info.device if info.device.type == "cuda" else torch.device("cpu")
    # member counts first: the blocks are padded to the largest for all_gather
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm)
    counts = [torch.empty_like(count) for _ in range(info.world_size)]
    _collective("gather_members (counts)", info, _all_gather, counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = _pad_rows(local.detach().to(comm), max(sizes))
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    _collective(f"gather_members {tuple(local.shape)}", info, _all_gather, parts, padded)
    return concat_padded(parts, sizes).to(local.device)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out


def concat_padded(parts: list[Tensor], sizes: list[int]) -> Tensor:
    """The first ``sizes[r]`` rows of each ``parts[r]``, concatenated along dim 0."""
    if len(parts) != len(sizes):
        raise ValueError(f"concat_padded: {len(parts)} parts but {len(sizes)} sizes")
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# ---- member-sharded state ---------------------------------------------------------------
#: the entries of EnsembleTrainer.state_dict() whose tensors (≥ 1 dim) are member-major
_SHARDED = ("ensemble", "optimizer", "history")


def _map_tree(obj: Any, fn) -> Any:
    # every tensor with a leading member dim goes through fn; 0-d tensors (e.g. a scalar
    # step count) and plain values are the same on every rank and stay as they are
    if isinstance(obj, Tensor):
        return fn(obj) if obj.dim() >= 1 else obj
    if isinstance(obj, dict):
        out = type(obj)((k, _map_tree(v, fn)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            # nn.Module.state_dict() carries per-module versions (BatchNorm) that
            # load_state_dict reads
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [_map_tree(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tree(v, fn) for v in obj)
    return obj


def gather_trainer_state(state: dict, info: DistInfo) -> dict:
    """A rank's :meth:`EnsembleTrainer.state_dict` → the state of the whole ensemble
    (every member, in global order), on every rank.

    Contract: in ``state["ensemble"]``, ``state["optimizer"]`` (momentum buffers,
    per-member ``lr``/``weight_decay`` tensors) and ``state["history"]`` every tensor with
    at least one dim is member-major (``[m_r, ...]``); 0-d tensors and other values are
    equal on every rank and kept. Collective: every rank must call it. With one process
    ``state`` itself is returned.
    """
    _check_state(state, "gather_trainer_state")
    if not info.distributed:
        return state
    return {k: (_map_tree(v, lambda t: gather_members(t, info)) if k in _SHARDED else v)
            for k, v in state.items()}


def slice_trainer_state(state: dict, members: range) -> dict:
    """The full trainer state (all members) → the state of ``members`` (a contiguous
    range of global indices, as :func:`member_range` gives), to load into a rank's
    :class:`EnsembleTrainer`. Same contract as :func:`gather_trainer_state`."""
    _check_state(state, "slice_trainer_state")
    if not isinstance(members, range) or members.step != 1 or len(members) == 0:
        raise ValueError(f"slice_trainer_state: members must be a non-empty range with step "
                         f"1, got {members!r}")

    def cut(t: Tensor) -> Tensor:
        if members.stop > t.shape[0]:
            raise ValueError(f"slice_trainer_state: members {members.start}..{members.stop - 1}"
                             f" but the checkpoint holds a tensor of {t.shape[0]} members")
        return t[members.start:members.stop].clone()

    return {k: (_map_tree(v, cut) if k in _SHARDED else v) for k, v in state.items()}


def _check_state(state, fn: str) -> None:
    if not isinstance(state, dict) or "ensemble" not in state:
        raise TypeError(f"{fn}: expected an EnsembleTrainer.state_dict() (a dict with "
                        f"'ensemble', 'optimizer', 'history'), got {type(state).__name__}")
