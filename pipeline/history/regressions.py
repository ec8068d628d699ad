"""Did tonight move? Compare one run's rows with the same measurements in earlier runs.

The baseline of a measurement is the median over the last `window` earlier runs that made it:
one noisy night neither raises an alarm by itself nor, as a baseline, hides the next real drop.
Only like is compared with like: accuracy within the same suite and task data (the
manifest's digest), task count, method, parameters
and model; merge time additionally on the same hardware, since seconds on another machine say
nothing about the code.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.history.store import MEAN

ACCURACY_KEY = ("kind", "suite", "manifest_digest", "model", "num_tasks", "method", "params",
                "task")
TIME_KEY = ACCURACY_KEY + ("hardware",)


@dataclass(frozen=True)
class Thresholds:
    max_accuracy_drop: float = 1.0        # normalized accuracy, percentage points (mean row)
    max_task_accuracy_drop: float | None = None  # the same per task; None: not checked
    max_time_increase: float = 0.5        # merge seconds, fraction above the baseline ...
    min_time_increase_s: float = 2.0      # ... and at least this many seconds (timer noise)
    window: int = 5                       # earlier runs in the baseline (median)

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "max_time_increase", "min_time_increase_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"threshold {name} must be >= 0, got {getattr(self, name)}")
        if self.max_task_accuracy_drop is not None and not self.max_task_accuracy_drop >= 0:
            raise InputError("threshold max_task_accuracy_drop must be >= 0 or null")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise InputError(f"threshold window must be an integer >= 1, got {self.window!r}")

    @classmethod
    def from_mapping(cls, values: Any, source: str) -> "Thresholds":
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise InputError(f"{source}: thresholds must be a mapping, got {values!r}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise InputError(f"{source}: thresholds: {exc}") from None


@dataclass(frozen=True)
class Regression:
    metric: str          # "normalized_accuracy" or "merge_seconds"
    suite: str
    num_tasks: int
    method: str
    task: str
    current: float
    baseline: float
    baseline_runs: int
    limit: float         # the value the current one crossed

    def describe(self) -> str:
        where = f"{self.method} on {self.suite} T={self.num_tasks}" + (
            f" task {self.task}" if self.task != MEAN else "")
        if self.metric == "merge_seconds":
            return (f"merge time of {where}: {self.current:.2f} s vs baseline "
                    f"{self.baseline:.2f} s (limit {self.limit:.2f} s, "
                    f"{self.baseline_runs} earlier runs)")
        return (f"normalized accuracy of {where}: {100 * self.current:.1f}% vs baseline "
                f"{100 * self.baseline:.1f}% (limit {100 * self.limit:.1f}%, "
                f"{self.baseline_runs} earlier runs)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def detect_regressions(history: pa.Table, run_id: str, thresholds: Thresholds
                       ) -> list[Regression]:
    """Regressions of run `run_id` against the runs before it in `history`."""
    rows = history.to_pylist()
    current = [r for r in rows if r["run_id"] == run_id]
    if not current:
        raise InputError(f"run {run_id} is not in the history")
    start = min(r["timestamp"] for r in current)
    earlier = [r for r in rows if r["run_id"] != run_id and r["timestamp"] < start]
    found: list[Regression] = []
    for row in current:
        drop = (thresholds.max_accuracy_drop if row["task"] == MEAN
                else thresholds.max_task_accuracy_drop)
        if drop is not None and row["normalized_accuracy"] is not None:
            base = _baseline(earlier, row, ACCURACY_KEY, "normalized_accuracy", thresholds.window)
            if base is not None:
                limit = base[0] - drop / 100
                if row["normalized_accuracy"] < limit:
                    found.append(_regression("normalized_accuracy", row, base, limit))
        if row["task"] == MEAN and row["merge_seconds"] is not None:
            base = _baseline(earlier, row, TIME_KEY, "merge_seconds", thresholds.window)
            if base is not None:
                limit = max(base[0] * (1 + thresholds.max_time_increase),
                            base[0] + thresholds.min_time_increase_s)
                if row["merge_seconds"] > limit:
                    found.append(_regression("merge_seconds", row, base, limit))
    return found


def _baseline(earlier: Iterable[dict], row: dict, key: tuple[str, ...], metric: str,
              window: int) -> tuple[float, int] | None:
    """Median of `metric` over the last `window` earlier runs with the same key."""
    per_run: dict[str, tuple[Any, float]] = {}
    for r in earlier:
        if r[metric] is not None and all(r[k] == row[k] for k in key):
            per_run[r["run_id"]] = (r["timestamp"], r[metric])
    if not per_run:
        return None
    last = sorted(per_run.values(), key=lambda tv: tv[0])[-window:]
    return statistics.median(v for _, v in last), len(last)


def _regression(metric: str, row: dict, base: tuple[float, int], limit: float) -> Regression:
    return Regression(metric=metric, suite=row["suite"], num_tasks=row["num_tasks"],
                      method=row["method"], task=row["task"], current=row[metric],
                      baseline=base[0], baseline_runs=base[1], limit=limit)
