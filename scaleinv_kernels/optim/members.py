"""Ensemble tensors: parameters whose leading dimension indexes M independent members.

An ensemble stores M copies of a network as parameters of shape ``[M, *shape]`` and marks
each with :func:`mark_members`. :class:`~scaleinv_kernels.FusedSGDWD` then cuts such a
tensor into M segments: statistics per (member, tensor), and a param group may give each
member its own ``lr`` / ``weight_decay`` (1-D tensors of length M).
"""

from __future__ import annotations

from torch import Tensor

_ATTR = "_scaleinv_members"


def mark_members(t: Tensor, members: int) -> Tensor:
    """Mark ``t`` (shape ``[members, ...]``) as an ensemble tensor; returns ``t``.

    Raises ValueError if ``t`` is 0-d, its leading dimension is not ``members``, or
    ``members < 1``.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"mark_members: expected a Tensor, got {type(t).__name__}")
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ValueError(f"mark_members: the member count must be an int >= 1, got {members!r}")
    if t.dim() == 0:
        raise ValueError("mark_members: a 0-d tensor has no member dimension")
    if t.shape[0] != members:
        raise ValueError(f"mark_members: tensor of shape {list(t.shape)} has leading dimension "
                         f"{t.shape[0]}, not the member count {members}")
    setattr(t, _ATTR, members)
    return t


def members_of(t: Tensor) -> int | None:
    """The member count set by :func:`mark_members`, or None for an ordinary tensor."""
    return getattr(t, _ATTR, None)
