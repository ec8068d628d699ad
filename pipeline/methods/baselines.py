"""Weight averaging and Task Arithmetic: the sum of task vectors, scaled differently."""

from __future__ import annotations

import torch

from pipeline.methods.registry import LINEAR_ALPHA_GRID, register


@register("average", "elementwise", fixed_alpha=lambda num_tasks: 1.0 / num_tasks)
def average(deltas: torch.Tensor) -> torch.Tensor:
    """tau_M = sum_t tau_t with alpha fixed to 1/T, i.e. the mean of the fine-tuned weights."""
    return deltas.sum(dim=0)


@register("task_arithmetic", "elementwise", alpha_grid=LINEAR_ALPHA_GRID)
def task_arithmetic(deltas: torch.Tensor) -> torch.Tensor:
    """tau_M = sum_t tau_t; alpha is searched (Ilharco et al., 2023)."""
    return deltas.sum(dim=0)
