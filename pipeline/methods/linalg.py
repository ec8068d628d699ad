"""SVDs, top singular triplets and polar factors: fast where that is safe, robust where not.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

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


@contextlib.contextmanager
def _timed() -> Iterator[None]:
    """Count one decomposition (SVD or Gram eigh) and its time in the active log."""
    log = _log.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        if log is not None:
            log.svd_calls += 1
            log.svd_seconds += time.perf_counter() - start


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD `x = U diag(s) Vh` (s descending), robust to LAPACK non-convergence."""
    with _timed():
        return _robust_svd(x)


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


# The fast paths below decompose the float64 Gram matrix of the short side instead of x.
# Why: on CPU, eigh of an r x r Gram costs less than an SVD of x (about half for a
# 1024 x 4096 matrix, where a plain SVD of the wide side costs 3x more again), and float64
# Gram entries of float32 data carry ~16 digits. Squaring costs accuracy as eps * (s_1 / s_k)^2
# in what is derived from small singular values, so the Gram is trusted down to eigenvalues
# GRAM_TRUST * largest (singular values 1e-5 of the largest: errors ~1e-6); below that the
# fast paths fall back to a float64 SVD and record it.
GRAM_TRUST = 1e-10


def gram_eigh(x: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of x x^T (rows) or x^T x."""
    with _timed():
        lam, w = torch.linalg.eigh(x @ x.mT if rows else x.mT @ x)
    return lam.flip(0).clamp(min=0), w.flip(1)


# TSV-M keeps r / T of the r directions of each task. After the tridiagonal reduction, LAPACK's
# MRRR (syevr) computes just those eigenvectors; torch's eigh (divide and conquer) computes all
# r, and so takes 1.5-2.5x longer on CPU for r = 768..1024 and k = r/8..r/20, at the same
# float64 accuracy. torch has no subset eigensolver; SciPy's LAPACK does. Past a third of the
# short side, or on a GPU, the full eigh is as fast, and is used.
SUBSET_BELOW = 1 / 3


def top_gram_eigh(x: torch.Tensor, rows: bool, count: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` largest eigenvalues (descending, clamped at 0) of x x^T (rows) or x^T x,
    and their eigenvectors; at least the top `count`, maybe all."""
    gram = x @ x.mT if rows else x.mT @ x
    size = gram.shape[0]
    if gram.device.type != "cpu" or not 0 < count <= SUBSET_BELOW * size:
        with _timed():
            lam, w = torch.linalg.eigh(gram)
        return lam.flip(0).clamp(min=0), w.flip(1)
    lapack = _scipy_linalg()
    with _timed():
        lam_np, w_np = lapack.eigh(gram.numpy(), driver="evr", check_finite=False,
                                   subset_by_index=[size - count, size - 1])
    lam, w = torch.from_numpy(lam_np).to(x.dtype), torch.from_numpy(w_np).to(x.dtype)
    return lam.flip(0).clamp(min=0), w.flip(1)


_blas_threads: int | None = None


def _scipy_linalg():
    """SciPy's LAPACK, its BLAS limited to torch's thread count: the thread count changes the
    bits of a decomposition, so it follows the caller's setting (the engine fixes it per
    worker), never the library's default. Imported on first use: it costs about a second."""
    global _blas_threads
    import scipy.linalg
    threads = torch.get_num_threads()
    if _blas_threads != threads:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads, user_api="blas")
        _blas_threads = threads
    return scipy.linalg


def float64_svd(x: torch.Tensor, why: str):
    """The fallback when a Gram cannot be trusted: a robust SVD of x (float64), recorded."""
    _record(f"{why}: {'x'.join(map(str, x.shape))} beyond float64 Gram accuracy; "
            f"solved by float64 SVD")
    return svd(x)


# For the top k of a float32 matrix, the Gram and its eigh can be float32 (about 60% of the
# time of float64 on this CPU) when the result is then refined in float64: Rayleigh-Ritz of x
# on the float32 eigenvectors of the top k + p directions (oversampling p = k / 4, at least
# 16). The float32 subspace is trusted when its last direction still carries eigenvalue
# MIXED_TRUST * largest (singular values 1e-2 of the largest). What remains is the float32
# Gram's rounding, eps32 * s_1^2 / s_j^2 in the j-th vector: on the benchmark's power-law
# spectra the top-k product is within 1-3e-6 of float64, as close as a float32 LAPACK SVD
# gets, and more oversampling does not change that. It is opt-in because a later polar factor
# of concatenated vectors (TSV-M, Iso-CTS) amplifies it: TSV-M went from 3e-7 to 4e-5 of the
# float64 spec with it, too near the 1e-4 budget. The refinement costs products with k + p
# columns, so past half the short side the float64 Gram is cheaper, and is used.
MIXED_TRUST = 1e-4


def top_svd(x: torch.Tensor, k: int, float32_subspace: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets of x, in float64: (m, k), (k,), (k, n).

    Only the short side's Gram is decomposed; the other side's vectors come from one product.
    Sign and basis choices inside repeated singular values differ from LAPACK's, which no
    merge in the spec can see. `float32_subspace` allows the mixed-precision path (above) for
    callers whose output is the triplets themselves, at float32-SVD accuracy."""
    short = min(x.shape[-2:])
    oversampled = k + max(16, k // 4)
    if (float32_subspace and x.dtype != torch.float64 and k > 0
            and oversampled <= short // 2):
        found = _top_svd_mixed(x, k, oversampled)
        if found is not None:
            return found
    xd = x.to(torch.float64)
    rows = xd.shape[0] <= xd.shape[1]
    lam, w = top_gram_eigh(xd, rows, k)
    if k == 0 or lam[k - 1] > GRAM_TRUST * lam[0]:
        return _triplets_from_gram(xd, rows, lam[:k].sqrt(), w[:, :k])
    u, s, vh = float64_svd(xd, "top singular triplets")
    return u[:, :k], s[:k], vh[:k]


def _triplets_from_gram(xd: torch.Tensor, rows: bool, s: torch.Tensor, top: torch.Tensor):
    """(U, s, Vh) from the top eigenvectors of the short side's Gram: one product."""
    if rows:
        return top, s, (top.mT @ xd) / s[:, None]
    return (xd @ top) / s, s, top.mT


def _top_svd_mixed(x: torch.Tensor, k: int, oversampled: int):
    """`top_svd` from a float32 Gram refined in float64; None where float32 is not enough."""
    x32 = x.to(torch.float32)
    rows = x32.shape[0] <= x32.shape[1]
    lam, w = gram_eigh(x32, rows)
    if not lam[oversampled - 1] > MIXED_TRUST * lam[0]:
        return None
    basis = torch.linalg.qr(w[:, :oversampled].to(torch.float64)).Q
    xd = x.to(torch.float64)
    projected = basis.mT @ xd if rows else xd @ basis  # (k + p, n) or (m, k + p)
    lam_p, w_p = gram_eigh(projected, rows)
    if not lam_p[k - 1] > GRAM_TRUST * lam_p[0]:
        return None
    s, top = lam_p[:k].sqrt(), w_p[:, :k]
    if rows:
        return basis @ top, s, (top.mT @ projected) / s[:, None]
    return (projected @ top) / s, s, (basis @ top).mT


def top_svd_and_complement(x: torch.Tensor, k: int, why: str = "top singular triplets"):
    """`top_svd`, plus an orthonormal basis of the short side's space orthogonal to the top-k
    singular vectors there: (m, m - k) when m <= n, else (n, n - k). It comes for free with
    the Gram's eigenvectors, and lets Iso-CTS decompose residuals in a small frame."""
    xd = x.to(torch.float64)
    rows = xd.shape[0] <= xd.shape[1]
    lam, w = gram_eigh(xd, rows)
    if k == 0 or lam[k - 1] > GRAM_TRUST * lam[0]:
        return (*_triplets_from_gram(xd, rows, lam[:k].sqrt(), w[:, :k]), w[:, k:])
    u, s, vh = float64_svd(xd, why)
    if rows:  # m <= n: u is square
        return u[:, :k], s[:k], vh[:k], u[:, k:]
    return u[:, :k], s[:k], vh[:k], vh[k:].mT


def polar_and_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The polar factor of x and all min(m, n) singular values (descending), in float64.

    polar = x (x^T x)^(-1/2) (or the row-side mirror) from one eigh of the short-side Gram."""
    xd = x.to(torch.float64)
    tall = xd.shape[0] >= xd.shape[1]
    lam, w = gram_eigh(xd, rows=not tall)
    if not lam[-1] > GRAM_TRUST * lam[0]:
        u, s, vh = float64_svd(xd, "polar factor")
        return u @ vh, s
    inverse_root = (w * lam.rsqrt()) @ w.mT
    return (xd @ inverse_root if tall else inverse_root @ xd), lam.sqrt()
