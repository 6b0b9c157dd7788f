"""scaleinv_kernels: fused kernels for research on scale-invariant networks trained
with SGD + weight decay. Public API only; see README.md."""

from scaleinv_kernels.optim import STAT_FIELDS, FusedSGDWD, LayerStats, StatsRecorder

__all__ = ["FusedSGDWD", "LayerStats", "StatsRecorder", "STAT_FIELDS"]
__version__ = "0.1.0"
