"""Which device the Triton tests run on, and what the Triton interpreter does differently.

With CUDA present the Triton kernels are compiled and get CUDA tensors; without it they
run under the interpreter (``TRITON_INTERPRET=1``, set in conftest.py) on CPU tensors.
Tests take their tensors' device from :data:`TRITON_DEVICE` and ask this module where
the two differ, instead of assuming one of them.
"""

from __future__ import annotations

import functools
import os

import torch

CUDA = torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_fma_is_fused() -> bool:
    """Whether ``tl.fma(x, y, z)`` rounds once where the Triton kernels run.

    Compiled for a GPU it always does. The interpreter of triton 3.6 and 3.8 computes
    ``x*y + z`` with two roundings, triton 3.9's a fused multiply-add; so this asks the
    interpreter itself, with x = y = 1 + 2^-12 and z = -1: fused, 2^-11 + 2^-24; with
    two roundings, x*y rounds to 1 + 2^-11 (a tie, to even) and the result is 2^-11."""
    if not INTERPRETED:
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _fma_probe(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, -1.0))

    x = torch.tensor([1 + 2.0 ** -12], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    _fma_probe[(1,)](x, out)
    value = float(out)
    if value == 2.0 ** -11 + 2.0 ** -24:
        return True
    if value == 2.0 ** -11:
        return False
    raise AssertionError(f"tl.fma probe gave {value!r}, neither fused nor two roundings")


def fma_ulps() -> int:
    """How many float32 ulps a Triton kernel built on ``tl.fma`` may differ from torch's
    fused arithmetic here: 0 where ``tl.fma`` is fused (GPU, triton >= 3.9 interpreter),
    1 per fma'd store under an interpreter that rounds twice (an artifact of the
    interpreter, which the kernels cannot avoid: they ask for a fused operation)."""
    return 0 if triton_fma_is_fused() else 1
