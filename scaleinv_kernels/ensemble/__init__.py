"""M copies of a small network trained in one process (see :class:`Ensemble`)."""

from scaleinv_kernels.ensemble import metrics
from scaleinv_kernels.ensemble.convert import UnsupportedModuleError
from scaleinv_kernels.ensemble.ensemble import Ensemble
from scaleinv_kernels.ensemble.metrics import (
    average_weights,
    disagreement,
    l1_distance,
    label_distribution,
    noise_floor,
    pairwise_distances,
    predict,
)
from scaleinv_kernels.ensemble.trainer import EnsembleTrainer

__all__ = ["Ensemble", "EnsembleTrainer", "UnsupportedModuleError", "average_weights",
           "disagreement", "l1_distance", "label_distribution", "metrics", "noise_floor",
           "pairwise_distances", "predict"]
