"""An independent float64 reading of ../shared/ALGORITHMS.md, written from the text alone.

Deliberately naive (full SVDs, Python loops, no shared code with `pipeline`), so a bug in the
package cannot hide behind the same bug here. `benchmarks/svd_bench.py` also runs it in float32
as the straightforward per-key implementation the fast paths are timed against.
"""

from __future__ import annotations

import torch


F64 = torch.float64


def _svd(x, dtype=F64):
    return torch.linalg.svd(x.to(dtype), full_matrices=False)


def _polar(x, dtype=F64):
    u, _, vh = _svd(x, dtype)
    return u @ vh


def tsv_m(deltas, dtype=F64):
    T, m, n = deltas.shape
    if T == 1:
        return deltas[0].to(dtype)
    r = min(m, n)
    k = r // T
    u_cat, s_cat, vh_cat = torch.zeros(m, r, dtype=dtype), \
        torch.zeros(r, dtype=dtype), torch.zeros(r, n, dtype=dtype)
    for t in range(T):
        u, s, vh = _svd(deltas[t], dtype)
        u_cat[:, t * k:(t + 1) * k] = u[:, :k]
        s_cat[t * k:(t + 1) * k] = s[:k]
        vh_cat[t * k:(t + 1) * k, :] = vh[:k, :]
    return _polar(u_cat, dtype) @ torch.diag(s_cat) @ _polar(vh_cat, dtype)


def iso_c(deltas, dtype=F64):
    u, s, vh = _svd(deltas.to(dtype).sum(0), dtype)
    return s.mean() * u @ vh


def iso_cts(deltas, f=0.8, dtype=F64):
    T, m, n = deltas.shape
    r = min(m, n)
    c0 = int(r * f)
    ts = round((r - c0) / T) * T
    c = r - ts
    p = (r - c) // T
    u, s, vh = _svd(deltas.to(dtype).sum(0), dtype)
    uc, sc, vhc = u[:, :c], s[:c], vh[:c]
    u_all = torch.zeros(m, r, dtype=dtype)
    s_all = torch.zeros(r, dtype=dtype)
    vh_all = torch.zeros(r, n, dtype=dtype)
    for t in range(T):
        d = deltas[t].to(dtype)
        w = d - uc @ (uc.T @ d)
        ut, st, vht = _svd(w, dtype)
        u_all[:, t * p:(t + 1) * p] = ut[:, :p]
        s_all[t * p:(t + 1) * p] = st[:p]
        vh_all[t * p:(t + 1) * p] = vht[:p]
    u_all[:, T * p:T * p + c] = uc
    s_all[T * p:T * p + c] = sc
    vh_all[T * p:T * p + c] = vhc
    return s_all.mean() * _polar(u_all, dtype) @ _polar(vh_all, dtype)


def tsv_c(deltas, dtype=F64):
    T, m, n = deltas.shape
    k = min(m, n) // T
    out = []
    for t in range(T):
        u, s, vh = _svd(deltas[t], dtype)
        out.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    return torch.stack(out)


def ties(task_vectors: dict, k=20.0, merge_func="mean"):
    """Spec section 1 over a whole model: {key: (T, ...)} -> {key: merged}."""
    keys = sorted(task_vectors)
    T = task_vectors[keys[0]].shape[0]
    flat = torch.cat([task_vectors[key].reshape(T, -1) for key in keys], dim=1)
    N = flat.shape[1]
    kk = N - int(N * (k / 100))
    if kk == 0:
        trimmed = flat.clone()
    else:
        thresholds = torch.stack([flat[t].abs().sort().values[kk - 1] for t in range(T)])
        trimmed = torch.where(flat.abs() >= thresholds[:, None], flat, torch.zeros_like(flat))
    g = torch.sign(trimmed.sum(0))
    g[g == 0] = torch.sign(g.sum())
    keep = ((g > 0) & (trimmed > 0)) | ((g <= 0) & (trimmed < 0))
    kept = torch.where(keep, trimmed, torch.zeros_like(trimmed))
    if merge_func == "mean":
        merged = kept.sum(0) / (kept != 0).sum(0).clamp(min=1)
    elif merge_func == "sum":
        merged = kept.sum(0)
    else:
        merged = kept.abs().max(0).values * g
    out, offset = {}, 0
    for key in keys:
        size = task_vectors[key][0].numel()
        out[key] = merged[offset:offset + size].reshape(task_vectors[key].shape[1:])
        offset += size
    return out
