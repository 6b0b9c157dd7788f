"""Per-member random streams for the random layers of an ensemble (dropout).

Member ``g`` (its global index: ``member_offset`` + local index) draws the noise of the
``k``-th random layer call of its ``s``-th random forward pass from a generator seeded
by ``(seed, STREAM_RANDOM, g, s, k)`` only. Its masks, hence its trajectory, are the same
whichever members share its call (``members=`` slices, trainer chunks), in whatever
order the chunks run, and on whichever rank holds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scaleinv_kernels.ensemble.seeding import member_seed

STREAM_RANDOM = 2  # seeding.STREAM_INIT = 0 and STREAM_DATA = 1 are taken


def member_generator(seed: int, member: int, step: int, draw: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of member ``member``'s ``draw``-th random layer call in its
    ``step``-th random forward pass."""
    gen = torch.Generator(device=device)
    return gen.manual_seed(member_seed(seed, STREAM_RANDOM, member, step, draw))


def member_bernoulli(ctx, keep: float, shape: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> Tensor:
    """Masks of this call's members, ``[B·m, *shape[1:]]`` in the folded order (row
    ``b·m + i`` is sample ``b`` of member ``i``): member i's ``[B, *shape[1:]]`` block is
    Bernoulli(``keep``) drawn from its own generator. ``shape`` is one member's mask shape
    ``[B, ...]``. Advances the call's draw index ``ctx.draws``."""
    draw = ctx.draws
    ctx.draws += 1
    steps = ctx.steps.tolist()  # a CPU tensor: no device sync
    masks = []
    for j in range(ctx.m):
        local = ctx.start + j
        gen = member_generator(ctx.random_seed, ctx.member_offset + local, steps[local], draw,
                               device)
        masks.append(torch.empty(shape, device=device, dtype=dtype).bernoulli_(keep,
                                                                               generator=gen))
    stacked = torch.stack(masks, 1)  # [B, m, ...]
    return stacked.view(shape[0] * ctx.m, *shape[1:])
