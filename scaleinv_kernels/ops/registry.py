"""Where the ops' Python CUDA kernels are registered, and the mode that runs them on CPU.

Every ``scaleinv::*`` op has its schema in ``csrc/registration.cpp``, a C++ kernel for
the ``CPU`` dispatch key and a Python kernel (Triton, or plain torch where an op has no
Triton kernel) for ``CUDA``, registered here with :func:`register_cuda_kernel`.

CUDA code path on CPU tensors
-----------------------------
``SCALEINV_BACKEND=triton`` together with ``TRITON_INTERPRET=1`` (set before triton is
first imported) makes CPU tensors take the code that CUDA tensors take: the dispatcher
sends every ``scaleinv::*`` op on CPU tensors to the kernel registered for CUDA (the
Triton kernels then run in the interpreter), the C++ autograd functions redispatch into
them, and :func:`scaleinv_kernels.ops.sgd_wd.select_backend` answers ``"triton"`` for
CPU tensors, so ``FusedSGDWD.step`` builds its pointer, work and segment tables and its
per-device statistics buffers as on a GPU. This is how the CUDA-only Python logic is
tested without a GPU (``cuda_code_path_on_cpu()`` switches it on for a block). What
stays CUDA-only is named where it happens: pinned host buffers and non-blocking copies
(``sgd_wd_kernel.host_table``) and compilation of the kernels (proved ahead of time for
sm_80/sm_90 by the tests instead).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

BACKEND_ENV = "SCALEINV_BACKEND"

# "scaleinv::op" -> the Python kernel registered for CUDA
_CUDA_KERNELS: dict[str, Callable] = {}
_emulation_depth = 0


try:  # torch >= 2.6; the supported torch (2.11-2.14) has it
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover
    _set_wrap_triton_enabled = None


def launch_triton(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``torch.library.wrap_triton(kernel)[grid](*args, **kwargs)`` where torch has
    ``wrap_triton`` (torch >= 2.6), else ``kernel[grid](...)``: every op's Triton launch.

    The launch runs with wrap_triton's graph capture off, as ``torch.library.triton_op``'s
    eager path does: the dispatcher reaches the ops' kernels only with real tensors (fake
    and meta tensors go to the fake kernels; make_fx, export and torch.compile record each
    op as one node), and capture in eager mode would add every launch's constants (and,
    with ``num_warps``, a new autotuner) to torch's kernel side table at every step.
    torch 2.11's wrap_triton refuses an interpreted kernel (``TRITON_INTERPRET=1`` makes
    it an ``InterpretedFunction``, not a ``JITFunction``); that one is launched directly.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    capture_off = (_set_wrap_triton_enabled(False) if _set_wrap_triton_enabled is not None
                   else contextlib.nullcontext())
    with capture_off:
        if wrap is not None:
            try:
                kernel = wrap(kernel)
            except RuntimeError:
                if not _is_interpreted(kernel):
                    raise
        kernel[grid](*args, **kwargs)


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def register_cuda_kernel(op: str, fn: Callable) -> None:
    """Register ``fn`` as the CUDA kernel of ``op`` ("scaleinv::name"); remembered so
    that :func:`cuda_code_path_on_cpu` can route CPU tensors to it too."""
    torch.library.register_kernel(op, "cuda")(fn)
    _CUDA_KERNELS[op] = fn


def cuda_code_path_active() -> bool:
    """True while CPU tensors take the CUDA code path (see the module docstring)."""
    return _emulation_depth > 0


@contextlib.contextmanager
def cuda_code_path_on_cpu() -> Iterator[None]:
    """Within the block, CPU tensors given to ``scaleinv::*`` ops run the kernels
    registered for CUDA, and the optimizer picks its Triton branch for CPU params.

    The Triton kernels among them need ``TRITON_INTERPRET=1`` (set before triton is
    imported). Leaving the block restores the C++ CPU kernels."""
    global _emulation_depth
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the CUDA code path on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported")
    if _emulation_depth > 0:  # already routed (nested block, or the process-wide mode)
        _emulation_depth += 1
        try:
            yield
        finally:
            _emulation_depth -= 1
        return
    lib = torch.library.Library("scaleinv", "IMPL")
    entered = False
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore", UserWarning)
            for op, fn in _CUDA_KERNELS.items():
                lib.impl(op.split("::")[1], fn, "CPU")
        _emulation_depth += 1
        entered = True
        yield
    finally:
        if entered:
            _emulation_depth -= 1
        lib._destroy()  # the C++ CPU kernels are the CPU kernels again


_PROCESS_WIDE: contextlib.ExitStack | None = None


def enter_process_wide_mode() -> None:
    """With ``SCALEINV_BACKEND=triton`` in the environment, route CPU tensors to the CUDA
    kernels for the rest of the process (called once all ops are registered)."""
    global _PROCESS_WIDE
    if os.environ.get(BACKEND_ENV) != "triton" or _PROCESS_WIDE is not None:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{BACKEND_ENV}=triton sends CPU tensors through the CUDA code path, which "
            "needs the Triton interpreter: set TRITON_INTERPRET=1 too (before triton is "
            f"imported). CUDA tensors take the Triton kernels by default: unset {BACKEND_ENV} "
            "for that.")
    _PROCESS_WIDE = contextlib.ExitStack()
    _PROCESS_WIDE.enter_context(cuda_code_path_on_cpu())
