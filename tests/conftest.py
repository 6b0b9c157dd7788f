"""Test-wide set-up.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter, which
must be switched on before triton is first imported, hence here, before any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: the smoke-scale nets are tiny, so one
    thread is several times faster than two on a shared 2-core machine and immune to
    oversubscription; it also matches subprocess runs started with OMP_NUM_THREADS=1,
    which resume tests compare against (full-batch GD at its stability edge amplifies
    rounding differences between thread counts)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Every test starts from the same global RNG state, so a test drawing from it without
    its own generator sees the same numbers in every run (no draw-dependent flakes)."""
    torch.manual_seed(0)
