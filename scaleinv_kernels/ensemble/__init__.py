"""M copies of a small network trained in one process (see :class:`Ensemble`)."""

from scaleinv_kernels.ensemble.convert import UnsupportedModuleError
from scaleinv_kernels.ensemble.ensemble import Ensemble

__all__ = ["Ensemble", "UnsupportedModuleError"]
