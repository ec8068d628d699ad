"""Accuracy metrics and the spec's alpha selection (section 4), free of Ray and models.

Selection reads validation accuracies only; the test split is evaluated once, afterwards, at
the chosen alpha. The evaluation function is injected, so the rule is tested on stubs with
known accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Spec: stop after 3 consecutive alphas whose mean absolute validation accuracy does not beat
# the best so far.
EARLY_STOP_PATIENCE = 3


def absolute(acc: Mapping[str, float]) -> float:
    """Mean top-1 over tasks."""
    return sum(acc.values()) / len(acc)


def normalized(acc: Mapping[str, float], finetuned: Mapping[str, float]) -> float:
    """Mean over tasks of acc(merged) / acc(fine-tuned): a mean of ratios, not of means."""
    return sum(acc[t] / finetuned[t] for t in acc) / len(acc)


@dataclass
class SearchResult:
    alpha: float
    evaluated: list[dict] = field(default_factory=list)  # per alpha: val accuracies, means
    stopped_early: bool = False


def select_alpha(grid: Sequence[float],
                 validate: Callable[[list[float]], list[dict[str, float]]],
                 finetuned_val: Mapping[str, float], early_stop: bool = False,
                 wave: int | None = None) -> SearchResult:
    """Pick alpha = argmax of mean normalised validation accuracy (first on ties).

    `validate(alphas)` returns per-task validation accuracies for each alpha. Without early
    stopping the whole grid goes in one call (the pool runs it in parallel); with it, alphas
    go in waves of `wave`, in grid order, and the rule is applied in grid order, so the
    chosen alpha does not depend on the wave size.
    """
    if not grid:
        raise ValueError("empty alpha grid")
    wave = len(grid) if not early_stop else max(1, wave or 1)
    result = SearchResult(alpha=grid[0])
    best_norm = best_abs = float("-inf")
    since_best = 0
    for start in range(0, len(grid), wave):
        alphas = list(grid[start:start + wave])
        for alpha, acc in zip(alphas, validate(alphas)):
            val_absolute, val_normalized = absolute(acc), normalized(acc, finetuned_val)
            result.evaluated.append({"alpha": alpha, "val": dict(acc),
                                     "val_absolute": val_absolute,
                                     "val_normalized": val_normalized})
            if val_normalized > best_norm:
                best_norm, result.alpha = val_normalized, alpha
            if val_absolute > best_abs:
                best_abs, since_best = val_absolute, 0
            else:
                since_best += 1
            if early_stop and since_best >= EARLY_STOP_PATIENCE:
                result.stopped_early = True
                return result
    return result
