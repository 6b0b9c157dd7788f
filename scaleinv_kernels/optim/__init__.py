"""Optimizers built on the ops layer."""

from scaleinv_kernels.optim.fused_sgd_wd import FusedSGDWD
from scaleinv_kernels.optim.members import mark_members, members_of
from scaleinv_kernels.optim.stats import STAT_FIELDS, LayerStats, StatsRecorder

__all__ = ["FusedSGDWD", "LayerStats", "StatsRecorder", "STAT_FIELDS", "mark_members",
           "members_of"]
