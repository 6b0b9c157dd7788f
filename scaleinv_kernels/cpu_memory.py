"""Keep freed CPU memory mapped, so that an ensemble's big activations are not page-faulted
in again at every allocation.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves blocks above its mmap
threshold (128 KiB, adapted upwards to the largest block freed so far, at most 32 MiB)
with fresh ``mmap`` pages and returns them to the kernel when freed, and it trims the top
of the heap once more than twice that threshold is free there. An ensemble's training
step allocates and frees activations of several MiB each (a chunk of 4 normalized CNNs at
batch 64: 12.8 MB per layer-1 tensor) dozens of times per chunk, so every step takes tens
of thousands of minor page faults, each zeroing a 4 KiB page, and the kernel time they
cost is a noticeable share of the step, where the eager loop of single models (whose
tensors are 4× smaller) takes about one fault per step. With the thresholds raised the
ensemble step takes an order of magnitude fewer faults and less time, at the same peak
resident size.

:func:`retain_freed_memory` raises both thresholds for the whole process (this is what
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the environment would do at
start-up; jemalloc or tcmalloc via ``LD_PRELOAD`` are the usual alternatives). Freed
memory then stays in the process for reuse, and the resident size does not drop between
steps; with aligned allocations of varying placement the heap can hold a few freed blocks
more than the live peak before it settles (repeatedly allocating and freeing one large
tensor settles after a few rounds, some such blocks above the baseline; an ensemble's
training step keeps its peak resident size from step to step).
:class:`~scaleinv_kernels.ensemble.Ensemble` calls it at its first call on CPU tensors
(``retain_cpu_memory=True``, the default).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("scaleinv_kernels")

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MIB = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (only glibc and a few others have it)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def retain_freed_memory(mmap_threshold_mib: int = 256, trim_threshold_mib: int = 1024) -> bool:
    """Serve CPU blocks below ``mmap_threshold_mib`` MiB from the heap and keep up to
    ``trim_threshold_mib`` MiB of freed heap mapped (glibc ``mallopt``), for this process.

    Returns True when glibc accepted both settings, False otherwise (another C library,
    or values glibc refuses); either way it says so once in the log. Idempotent (cached
    per arguments); changes no tensor and nothing else.
    """
    for name, value in (("mmap_threshold_mib", mmap_threshold_mib),
                        ("trim_threshold_mib", trim_threshold_mib)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise ValueError(f"retain_freed_memory: {name} must be an int in [1, 2^20] MiB, "
                             f"got {value!r}")
    libc = _libc()
    if libc is None:
        log.info("scaleinv_kernels: not glibc; CPU malloc thresholds left as they are")
        return False
    mmap_bytes = min(mmap_threshold_mib * MIB, 2**31 - 1)
    # older glibc refuse an mmap threshold above 32 MiB (half their heap size): fall back
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_bytes))) or bool(
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_bytes, 32 * MIB))))
    ok &= bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold_mib * MIB,
                                                                 2**31 - 1))))
    if ok:
        log.info("scaleinv_kernels: glibc malloc keeps freed CPU memory (mmap threshold %d "
                 "MiB, trim threshold %d MiB)", mmap_threshold_mib, trim_threshold_mib)
    else:
        log.warning("scaleinv_kernels: glibc refused the malloc thresholds (%d MiB, %d MiB); "
                    "CPU allocations keep faulting in fresh pages", mmap_threshold_mib,
                    trim_threshold_mib)
    return ok
