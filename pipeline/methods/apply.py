"""Route one key's task vectors to the right rule of its method (spec section 0).

This is the single per-key entry point shared by the in-process loop, the Ray workers and the
tests, so every path computes the same bits for the same key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.methods.registry import MethodSpec

DEFAULT_EXCLUDE = ("text_projection",)


def task_mean(deltas: torch.Tensor) -> torch.Tensor:
    return deltas.sum(dim=0) / deltas.shape[0]


def merge_key(method: MethodSpec, key: str, deltas: torch.Tensor, params: Mapping[str, Any],
              exclude: Sequence[str] = DEFAULT_EXCLUDE,
              statistics: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The merged task vector of one key from its stacked task vectors `(T, *shape)`."""
    if method.kind == "compress":
        raise ValueError(f"{method.name}: a compression method has no merged key; "
                         f"use compress_key")
    if method.kind == "matrix":
        if not method.uses_matrix_rule(key, tuple(deltas.shape[1:]), exclude):
            return task_mean(deltas)
        if not deltas.any():  # all-zero task vectors merge to zero; skip the SVDs
            return torch.zeros_like(deltas[0])
    extra = dict(statistics or {})
    if method.wants_key:
        extra["key"] = key
    return method.fn(deltas, **params, **extra)


def compress_key(method: MethodSpec, key: str, deltas: torch.Tensor, params: Mapping[str, Any],
                 exclude: Sequence[str] = DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:
    """Per-task compressed factors of one key; keys without the SVD treatment stay whole."""
    if not method.uses_matrix_rule(key, tuple(deltas.shape[1:]), exclude):
        return {"tau": deltas.contiguous()}
    return method.fn(deltas, **params)
