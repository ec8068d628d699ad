"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-C compression and TSV-M merging.

Both keep, per task, the top k = floor(r / T) singular triplets of its task matrix: together the
T tasks fill (at most) the r dimensions a merged matrix has. TSV-M then removes the interference
between tasks by replacing the concatenated singular vectors with their nearest orthonormal
matrices (polar factors), keeping the singular values as they were.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.methods.linalg import polar_and_spectrum, top_svd
from pipeline.methods.registry import SVD_ALPHA_GRID, register


def tsv_rank(rows: int, cols: int, num_tasks: int) -> int:
    """Triplets kept per task: floor(min(m, n) / T)."""
    return min(rows, cols) // num_tasks


def top_triplets(deltas: torch.Tensor, rank: int, float32_subspace: bool = False):
    """Stacked top-`rank` SVD factors of each task matrix, float64: (T, m, k), (T, k), (T, k, n)."""
    factors = [top_svd(delta, rank, float32_subspace) for delta in deltas]
    return tuple(torch.stack([f[i] for f in factors]) for i in range(3))


@register("tsv_m", "matrix", alpha_grid=SVD_ALPHA_GRID, svds_per_key=lambda t: t + 2)
def tsv_m(deltas: torch.Tensor) -> torch.Tensor:
    """polar(U_cat) diag(s_cat) polar(Vh_cat), task t's top-k in block [t k, (t+1) k).

    When T k < r the spec pads U_cat / Vh_cat with zero columns / rows whose singular values
    are zero; the polar factor's columns for them are arbitrary and then multiplied by zero,
    so only the T k kept blocks are decomposed: the same result, and no rank-deficient polar.
    The top-k triplets and the polar factors come from float64 Gram matrices (see linalg)."""
    num_tasks, rows, cols = deltas.shape
    if num_tasks == 1:
        return deltas[0].clone()
    rank = tsv_rank(rows, cols, num_tasks)
    if rank == 0:
        return torch.zeros_like(deltas[0])
    u, s, vh = top_triplets(deltas, rank)
    kept = num_tasks * rank
    u_cat = u.permute(1, 0, 2).reshape(rows, kept)
    s_cat = s.reshape(kept)
    vh_cat = vh.reshape(kept, cols)
    polar_u, _ = polar_and_spectrum(u_cat)
    polar_vh, _ = polar_and_spectrum(vh_cat)
    # Both factors are orthonormal: the last product is as accurate in the compute dtype.
    return (polar_u * s_cat).to(deltas.dtype) @ polar_vh.to(deltas.dtype)


def tsv_c_factor_shapes(rows: int, cols: int, num_tasks: int) -> dict[str, tuple[int, ...]]:
    """What TSV-C stores for one (m, n) matrix: per task U (m x k), s (k) and Vh (k x n)."""
    k = tsv_rank(rows, cols, num_tasks)
    return {"U": (num_tasks, rows, k), "S": (num_tasks, k), "Vh": (num_tasks, k, cols)}


def tsv_c_reconstruct(factors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One task's compressed matrix U diag(s) Vh from its stored factors."""
    return (factors["U"] * factors["S"]) @ factors["Vh"]


@register("tsv_c", "compress", fixed_alpha=lambda num_tasks: 1.0, svds_per_key=lambda t: t,
          factors=tsv_c_factor_shapes, reconstruct=tsv_c_reconstruct)
def tsv_c(deltas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per task the top-k factors: k (m + n + 1) numbers per matrix and task instead of m n.

    The factors are the output, stored in the input dtype, so a float32 subspace refined in
    float64 is accurate enough (see linalg.top_svd)."""
    num_tasks, rows, cols = deltas.shape
    u, s, vh = top_triplets(deltas, tsv_rank(rows, cols, num_tasks), float32_subspace=True)
    return {"U": u.to(deltas.dtype), "S": s.to(deltas.dtype), "Vh": vh.to(deltas.dtype)}
