"""Isotropic merging (Marczak et al., ICML 2025): Iso-C and Iso-CTS.

Summing task matrices concentrates the spectrum on a few directions that the largest tasks
dominate. Flattening it (every singular value set to the mean) gives each direction, and so each
task, equal weight. Iso-CTS first makes room for what the common subspace misses: each task's
top directions orthogonal to the common left subspace.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.errors import InputError
from pipeline.methods.linalg import polar_and_spectrum, top_svd, top_svd_and_complement
from pipeline.methods.registry import SVD_ALPHA_GRID, register


def float64_sum(deltas: torch.Tensor) -> torch.Tensor:
    """The task sum in float64, one task at a time. Why: where tasks cancel, a float32 sum
    leaves rounding noise that moves the small singular directions which the flattening then
    weights like the large ones."""
    total = torch.zeros(deltas.shape[1:], dtype=torch.float64, device=deltas.device)
    for delta in deltas:
        total += delta
    return total


@register("iso_c", "matrix", alpha_grid=SVD_ALPHA_GRID, svds_per_key=lambda t: 1)
def iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """mean(s) U Vh of the summed task matrix (mean over all r singular values): its polar
    factor and spectrum, from one eigh of the float64 Gram."""
    polar_sum, s = polar_and_spectrum(float64_sum(deltas))
    return (s.mean() * polar_sum).to(deltas.dtype)


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


def _common_subspace(total: torch.Tensor, common: int):
    """U_c, s_c, Vh_c of the summed matrix (float64), and, when the rows are the short side,
    the orthonormal complement of U_c in R^m.

    With m <= n the left singular vectors of the sum are a complete basis of R^m, so every
    residual Delta_t - U_c U_c^T Delta_t equals C (C^T Delta_t) for the complement C: its SVD
    is that of a small (r - c) x n matrix instead of an m x n one."""
    u, s, vh, complement = top_svd_and_complement(total, common, "Iso-CTS common subspace")
    return u, s, vh, complement if total.shape[0] <= total.shape[1] else None


def _orthonormal_columns_polar(u_tasks: torch.Tensor, u_common: torch.Tensor) -> torch.Tensor:
    """polar([U_tasks, U_c]) when U_c is orthonormal and orthogonal to U_tasks: then the Gram
    is block diagonal and the polar factor is [polar(U_tasks), U_c], a (T p)-sized problem.
    The orthogonality is checked, not assumed; otherwise the whole matrix is decomposed."""
    if u_tasks.shape[1] == 0:
        return u_common
    if u_common.shape[1] and float((u_common.mT @ u_tasks).abs().max()) > 1e-10:
        return polar_and_spectrum(torch.cat([u_tasks, u_common], dim=1))[0]
    return torch.cat([polar_and_spectrum(u_tasks)[0], u_common], dim=1)


@register("iso_cts", "matrix", alpha_grid=SVD_ALPHA_GRID,
          svds_per_key=lambda t: t + 3, validate=_validate)
def iso_cts(deltas: torch.Tensor, *, common_space_fraction: float = 0.8) -> torch.Tensor:
    """Common subspace of the sum + each task's top-p residual directions, then flattened."""
    polar_u, s_all, polar_vh = iso_cts_subspace(deltas, common_space_fraction)
    return s_all.mean().to(deltas.dtype) * (polar_u.to(deltas.dtype) @ polar_vh.to(deltas.dtype))


def iso_cts_subspace(deltas: torch.Tensor, common_space_fraction: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iso-CTS before its flattening: orthonormal left and right factors of the common and
    task-specific directions (float64) and the singular values they came with."""
    num_tasks, rows, cols = deltas.shape
    r = min(rows, cols)
    common, per_task = iso_cts_dimensions(r, num_tasks, common_space_fraction)
    if common < 0:  # the official arithmetic has no answer: rounding made T p exceed r
        raise InputError(f"iso_cts: common_space_fraction={common_space_fraction} leaves no "
                         f"valid split of rank {r} among {num_tasks} tasks; use a larger one")
    total = float64_sum(deltas)
    u_c, s_c, vh_c, complement = _common_subspace(total, common)
    u_tasks, s_tasks, vh_tasks = [], [], []
    if per_task:
        for delta in deltas:
            delta = delta.to(torch.float64)  # one task at a time: T float64 copies add up
            if complement is not None:  # residual = C (C^T delta), decomposed in C's frame
                ub, st, vht = top_svd(complement.mT @ delta, per_task)
                ut = complement @ ub
            else:
                ut, st, vht = top_svd(delta - u_c @ (u_c.mT @ delta), per_task)
            u_tasks.append(ut)
            s_tasks.append(st)
            vh_tasks.append(vht)
    # Task blocks first, the common block after them (spec step 4).
    u_res = torch.cat(u_tasks, dim=1) if u_tasks else u_c[:, :0]
    s_all = torch.cat(s_tasks + [s_c])
    vh_all = torch.cat(vh_tasks + [vh_c], dim=0)
    if complement is not None:
        polar_u = _orthonormal_columns_polar(u_res, u_c)
    else:  # U_c = M V_c / s_c is orthonormal only to Gram accuracy: decompose it all
        polar_u, _ = polar_and_spectrum(torch.cat([u_res, u_c], dim=1))
    polar_vh, _ = polar_and_spectrum(vh_all)
    return polar_u, s_all, polar_vh
