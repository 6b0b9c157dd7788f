"""Test-wide set-up.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter, which
must be switched on before triton is first imported, hence here, before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
