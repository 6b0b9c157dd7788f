"""Per-member random streams derived from (seed, stream, member index) only.

A member's randomness never depends on how many members share the process, on the
chunk it is trained in, or (later) on the rank that holds it, so a member can be
reproduced alone.
"""

from __future__ import annotations

import numpy as np
import torch

STREAM_INIT = 0  # independent initialisation of member i
STREAM_DATA = 1  # data order of member i (one sub-stream per epoch)


def member_seed(seed: int, stream: int, member: int, *extra: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` (NumPy SeedSequence mixing)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream, member, *extra])
    return int(words.generate_state(2, np.uint64)[0] >> np.uint64(1))


def member_generator(seed: int, stream: int, member: int, *extra: int) -> torch.Generator:
    """A CPU generator seeded with :func:`member_seed`."""
    return torch.Generator().manual_seed(member_seed(seed, stream, member, *extra))
