"""M copies of a small network trained in one process (see :class:`Ensemble`)."""

from scaleinv_kernels.ensemble import function_space, weight_space
from scaleinv_kernels.ensemble.convert import UnsupportedModuleError
from scaleinv_kernels.ensemble.ensemble import Ensemble
from scaleinv_kernels.ensemble.function_space import (
    disagreement,
    l1_distance,
    label_distribution,
    noise_floor,
    predict,
)
from scaleinv_kernels.ensemble.trainer import EnsembleTrainer
from scaleinv_kernels.ensemble.weight_space import average_weights, pairwise_distances

__all__ = ["Ensemble", "EnsembleTrainer", "UnsupportedModuleError", "average_weights",
           "disagreement", "function_space", "l1_distance", "label_distribution",
           "noise_floor", "pairwise_distances", "predict", "weight_space"]
