"""Route one key's task vectors to the right rule of its method (spec section 0).

This is the single per-key entry point shared by the in-process loop, the Ray workers and the
tests, so every path computes the same bits for the same key.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .registry import MethodSpec

DEFAULT_EXCLUDE = ("text_projection",)


def is_matrix_key(key: str, shape: Sequence[int], exclude: Sequence[str] = DEFAULT_EXCLUDE
                  ) -> bool:
    """Keys that get the SVD treatment: 2-D and not matching an exclusion substring."""
    return len(shape) == 2 and not any(pattern in key for pattern in exclude)


def task_mean(deltas: torch.Tensor) -> torch.Tensor:
    return deltas.sum(dim=0) / deltas.shape[0]


def merge_key(method: MethodSpec, key: str, deltas: torch.Tensor, params: Mapping[str, Any],
              exclude: Sequence[str] = DEFAULT_EXCLUDE,
              statistics: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The merged task vector of one key from its stacked task vectors `(T, *shape)`."""
    if method.kind in ("matrix", "compress") and not is_matrix_key(key, deltas.shape[1:], exclude):
        return task_mean(deltas)
    if method.kind == "matrix":
        if not deltas.any():  # all-zero task vectors merge to zero; skip the SVDs
            return torch.zeros_like(deltas[0])
        return method.fn(deltas, **params)
    if method.kind == "global":
        return method.fn(deltas, **params, **(statistics or {}))
    if method.kind == "elementwise":
        return method.fn(deltas, **params)
    raise ValueError(f"{method.name}: merge_key does not apply to {method.kind} methods")


def compress_key(method: MethodSpec, key: str, deltas: torch.Tensor, params: Mapping[str, Any],
                 exclude: Sequence[str] = DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:
    """Per-task compressed factors of one key; keys without the SVD treatment stay whole."""
    if not is_matrix_key(key, deltas.shape[1:], exclude):
        return {"tau": deltas.contiguous()}
    return method.fn(deltas, **params)
