"""Merge methods: pure tensor functions, registered by name. No Ray, no I/O."""

from pipeline.methods import baselines, isotropic, ties, tsv  # noqa: F401  (registers the methods)
from pipeline.methods.apply import DEFAULT_EXCLUDE, compress_key, merge_key, task_mean
from pipeline.methods.linalg import numerics_log, svd
from pipeline.methods.registry import (
                       LINEAR_ALPHA_GRID,
                       SVD_ALPHA_GRID,
                       MethodSpec,
                       ModelStatistics,
                       StatisticsState,
                       get_method,
                       method_names,
                       register,
)

__all__ = [
    "DEFAULT_EXCLUDE", "LINEAR_ALPHA_GRID", "SVD_ALPHA_GRID", "MethodSpec", "ModelStatistics",
    "StatisticsState", "compress_key", "get_method", "merge_key", "method_names", "numerics_log",
    "register", "svd", "task_mean",
]
