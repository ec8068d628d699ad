"""SVD and polar factors that do not kill a merge on a hard matrix.

float32 LAPACK SVD sometimes fails to converge on projected residuals (seen on a 768x3072
Iso-CTS residual of ViT-B/32 size). A ViT-L merge must not die there, so `svd` retries on the
transpose and then in float64, and records what it did in the active `numerics_log`, which ends
up in the merge report. Wide matrices are decomposed through their transpose because LAPACK is
~2x faster on the tall orientation; the factors are mathematically the same.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class NumericsLog:
    """What the SVDs of a block cost and which fallbacks they needed."""

    events: list[str] = field(default_factory=list)
    svd_calls: int = 0
    svd_seconds: float = 0.0


_log: contextvars.ContextVar[NumericsLog | None] = contextvars.ContextVar("numerics", default=None)


@contextlib.contextmanager
def numerics_log() -> Iterator[NumericsLog]:
    """Collect SVD timings and fallback events (non-converged SVDs) while the block runs."""
    log = NumericsLog()
    token = _log.set(log)
    try:
        yield log
    finally:
        _log.reset(token)


def _record(message: str) -> None:
    log = _log.get()
    if log is not None:
        log.events.append(message)


def _svd_tall_first(x: torch.Tensor, transpose: bool):
    if transpose:
        u, s, vh = torch.linalg.svd(x.mT, full_matrices=False)
        return vh.mT, s, u.mT
    return torch.linalg.svd(x, full_matrices=False)


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD `x = U diag(s) Vh` (s descending), robust to LAPACK non-convergence."""
    log = _log.get()
    if log is None:
        return _robust_svd(x)
    start = time.perf_counter()
    try:
        return _robust_svd(x)
    finally:
        log.svd_calls += 1
        log.svd_seconds += time.perf_counter() - start


def _robust_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wide = x.shape[-2] < x.shape[-1]
    try:
        return _svd_tall_first(x, transpose=wide)
    except torch.linalg.LinAlgError:
        pass
    shape = "x".join(map(str, x.shape))
    try:
        result = _svd_tall_first(x, transpose=not wide)
        _record(f"svd {shape} {x.dtype}: no convergence; solved on the other orientation")
        return result
    except torch.linalg.LinAlgError:
        pass
    if x.dtype == torch.float64:
        raise torch.linalg.LinAlgError(f"SVD of a {shape} float64 matrix did not converge")
    u, s, vh = _svd_tall_first(x.double(), transpose=wide)
    _record(f"svd {shape} {x.dtype}: no convergence; solved in float64")
    return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor `P Q` of `x = P diag(.) Q`: the nearest matrix with
    orthonormal columns (or rows) to x."""
    u, _, vh = svd(x)
    return u @ vh
