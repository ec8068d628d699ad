"""Isotropic merging (Marczak et al., ICML 2025): Iso-C and Iso-CTS.

Summing task matrices concentrates the spectrum on a few directions that the largest tasks
dominate. Flattening it (every singular value set to the mean) gives each direction, and so each
task, equal weight. Iso-CTS first makes room for what the common subspace misses: each task's
top directions orthogonal to the common left subspace.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import InputError
from .linalg import polar, svd
from .registry import SVD_ALPHA_GRID, register


@register("iso_c", "matrix", alpha_grid=SVD_ALPHA_GRID, svds_per_key=lambda t: 1)
def iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """mean(s) U Vh of the summed task matrix (mean over all r singular values)."""
    u, s, vh = svd(deltas.sum(dim=0))
    return s.mean() * (u @ vh)


def iso_cts_dimensions(rank: int, num_tasks: int, common_space_fraction: float
                       ) -> tuple[int, int]:
    """(c, p): common dimensions and per-task dimensions, in the official integer arithmetic.
    `round` is Python's (half to even), which the spec keeps on purpose."""
    common = int(rank * common_space_fraction)
    task_specific = round((rank - common) / num_tasks) * num_tasks
    common = rank - task_specific
    return common, (rank - common) // num_tasks


def _validate(params: Mapping) -> None:
    f = params["common_space_fraction"]
    if not 0 < f < 1:
        raise InputError(f"iso_cts: common_space_fraction must be in (0, 1), got {f}")


@register("iso_cts", "matrix", alpha_grid=SVD_ALPHA_GRID,
          svds_per_key=lambda t: t + 3, validate=_validate)
def iso_cts(deltas: torch.Tensor, *, common_space_fraction: float = 0.8) -> torch.Tensor:
    """Common subspace of the sum + each task's top-p residual directions, then flattened."""
    num_tasks, rows, cols = deltas.shape
    r = min(rows, cols)
    common, per_task = iso_cts_dimensions(r, num_tasks, common_space_fraction)
    if common < 0:  # the official arithmetic has no answer: rounding made T p exceed r
        raise InputError(f"iso_cts: common_space_fraction={common_space_fraction} leaves no "
                         f"valid split of rank {r} among {num_tasks} tasks; use a larger one")
    u, s, vh = svd(deltas.sum(dim=0))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    u_all = deltas.new_zeros(rows, r)
    s_all = deltas.new_zeros(r)
    vh_all = deltas.new_zeros(r, cols)
    if per_task:
        for t in range(num_tasks):
            residual = deltas[t] - u_c @ (u_c.mT @ deltas[t])
            ut, st, vht = svd(residual)
            block = slice(t * per_task, (t + 1) * per_task)
            u_all[:, block] = ut[:, :per_task]
            s_all[block] = st[:per_task]
            vh_all[block] = vht[:per_task]
    tail = slice(num_tasks * per_task, num_tasks * per_task + common)
    u_all[:, tail] = u_c
    s_all[tail] = s_c
    vh_all[tail] = vh_c
    return s_all.mean() * (polar(u_all) @ polar(vh_all))
