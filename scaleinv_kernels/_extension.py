"""Loads the compiled CPU kernels (``scaleinv_kernels._C``) once.

If the extension is missing the ops fall back to their plain-torch references and say
so once in the log (logger ``scaleinv_kernels``). With ``SCALEINV_REQUIRE_EXT=1`` in the
environment a missing extension is an error instead: the test suite runs that way so a
broken build can never pass unnoticed.
"""

from __future__ import annotations

import logging
import os
from functools import cache

log = logging.getLogger("scaleinv_kernels")


@cache
def extension_loaded() -> bool:
    """True when ``scaleinv_kernels._C`` is importable (its ops are then registered)."""
    try:
        from scaleinv_kernels import _C  # noqa: F401
    except ImportError as err:
        if os.environ.get("SCALEINV_REQUIRE_EXT") == "1":
            raise RuntimeError(
                "scaleinv_kernels._C (the compiled CPU kernels) failed to import and "
                "SCALEINV_REQUIRE_EXT=1 forbids the reference fallback; rebuild with "
                "`pip install --no-build-isolation -e .` (see README)."
            ) from err
        log.warning(
            "scaleinv_kernels: compiled extension not available (%s); CPU ops run their "
            "plain-torch reference implementations (slower, same results). Rebuild it "
            "against the installed torch with `pip install --no-build-isolation -e .` "
            "(from the source tree, with setuptools>=77, wheel and ninja installed).",
            err,
        )
        return False
    return True


@cache
def triton_available() -> bool:
    """True when Triton imports (needed for the CUDA kernels)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        log.warning(
            "scaleinv_kernels: triton is not installed (%s); CUDA ops run their plain-torch "
            "references. `pip install triton` to get the fused CUDA kernels.",
            err,
        )
        return False
    return True


@cache
def log_once(message: str) -> None:
    """Log ``message`` as a warning the first time it is given (logger
    ``scaleinv_kernels``): the ops say so once when they fall back to a reference."""
    log.warning("scaleinv_kernels: %s", message)
