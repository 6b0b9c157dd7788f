"""Re-exports function_space and weight_space; removed once nothing imports it."""

from scaleinv_kernels.ensemble.function_space import *  # noqa: F403
from scaleinv_kernels.ensemble.function_space import __all__ as _fs_all
from scaleinv_kernels.ensemble.weight_space import *  # noqa: F403
from scaleinv_kernels.ensemble.weight_space import __all__ as _ws_all

__all__ = [*_fs_all, *_ws_all]
