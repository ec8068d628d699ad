"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-C compression and TSV-M merging.

Both keep, per task, the top k = floor(r / T) singular triplets of its task matrix: together the
T tasks fill (at most) the r dimensions a merged matrix has. TSV-M then removes the interference
between tasks by replacing the concatenated singular vectors with their nearest orthonormal
matrices (polar factors), keeping the singular values as they were.
"""

from __future__ import annotations

import torch

from .linalg import polar, svd
from .registry import SVD_ALPHA_GRID, register


def tsv_rank(rows: int, cols: int, num_tasks: int) -> int:
    """Triplets kept per task: floor(min(m, n) / T)."""
    return min(rows, cols) // num_tasks


def top_triplets(deltas: torch.Tensor, rank: int):
    """Stacked top-`rank` SVD factors of each task matrix: (T, m, k), (T, k), (T, k, n)."""
    factors = [svd(delta) for delta in deltas]
    u = torch.stack([f[0][:, :rank] for f in factors])
    s = torch.stack([f[1][:rank] for f in factors])
    vh = torch.stack([f[2][:rank] for f in factors])
    return u, s, vh


@register("tsv_m", "matrix", alpha_grid=SVD_ALPHA_GRID, svds_per_key=lambda t: t + 2)
def tsv_m(deltas: torch.Tensor) -> torch.Tensor:
    """polar(U_cat) diag(s_cat) polar(Vh_cat), task t's top-k in block [t k, (t+1) k)."""
    num_tasks, rows, cols = deltas.shape
    if num_tasks == 1:
        return deltas[0].clone()
    rank = tsv_rank(rows, cols, num_tasks)
    if rank == 0:
        return torch.zeros_like(deltas[0])
    r = min(rows, cols)
    u, s, vh = top_triplets(deltas, rank)
    kept = num_tasks * rank
    u_cat = deltas.new_zeros(rows, r)
    s_cat = deltas.new_zeros(r)
    vh_cat = deltas.new_zeros(r, cols)
    u_cat[:, :kept] = u.permute(1, 0, 2).reshape(rows, kept)
    s_cat[:kept] = s.reshape(kept)
    vh_cat[:kept] = vh.reshape(kept, cols)
    return (polar(u_cat) * s_cat) @ polar(vh_cat)


@register("tsv_c", "compress", fixed_alpha=lambda num_tasks: 1.0, svds_per_key=lambda t: t)
def tsv_c(deltas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per task the top-k factors: k (m + n + 1) numbers per matrix and task instead of m n."""
    num_tasks, rows, cols = deltas.shape
    u, s, vh = top_triplets(deltas, tsv_rank(rows, cols, num_tasks))
    return {"U": u.contiguous(), "S": s.contiguous(), "Vh": vh.contiguous()}


def tsv_c_reconstruct(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """One task's compressed matrix U diag(s) Vh from its stored factors."""
    return (u * s) @ vh
