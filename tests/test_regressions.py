"""Regression detection: fires on a planted regression, stays quiet on noise within threshold."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from pipeline.errors import InputError
from pipeline.history.regressions import Thresholds, detect_regressions
from pipeline.history.store import MEAN, make_table

START = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.timezone.utc)
METHODS = ("tsv_m", "iso_cts")


def night(day: int, accuracy: dict[str, float], seconds: dict[str, float],
          hardware: str = "cpu-a", task_accuracy: float = 0.7) -> list[dict]:
    rows = []
    for method in METHODS:
        common = {"run_id": f"night-{day:02d}", "timestamp": START + dt.timedelta(days=day),
                  "kind": "bench", "suite": "standard", "model": "suite-x", "num_tasks": 8,
                  "method": method, "params": "{}", "hardware": hardware}
        rows.append({**common, "task": MEAN, "normalized_accuracy": accuracy[method],
                     "merge_seconds": seconds[method]})
        rows.append({**common, "task": "digits", "normalized_accuracy": task_accuracy})
    return rows


def noisy_history(nights: int = 7, seed: int = 0) -> list[dict]:
    """Accuracy 0.65 +- 0.3 points and merge time 10 s +- 5%: normal night-to-night noise."""
    rng = random.Random(seed)
    rows = []
    for day in range(nights):
        rows += night(day, {m: 0.65 + rng.uniform(-0.003, 0.003) for m in METHODS},
                      {m: 10 * (1 + rng.uniform(-0.05, 0.05)) for m in METHODS})
    return rows


def check(rows: list[dict], thresholds: Thresholds = Thresholds()):
    run_id = max(rows, key=lambda r: r["timestamp"])["run_id"]
    return detect_regressions(make_table(rows), run_id, thresholds)


@pytest.mark.parametrize("seed", range(5))
def test_noise_within_threshold_is_quiet(seed):
    rows = noisy_history(seed=seed)
    rng = random.Random(100 + seed)
    rows += night(7, {m: 0.65 + rng.uniform(-0.005, 0.005) for m in METHODS},
                  {m: 10 * (1 + rng.uniform(-0.1, 0.1)) for m in METHODS})
    assert check(rows) == []


def test_a_planted_accuracy_drop_fires_for_that_method_only():
    rows = noisy_history() + night(7, {"tsv_m": 0.65, "iso_cts": 0.62},
                                   {"tsv_m": 10.0, "iso_cts": 10.0})
    (found,) = check(rows)
    assert (found.metric, found.method, found.task) == ("normalized_accuracy", "iso_cts", MEAN)
    assert found.current == 0.62 and abs(found.baseline - 0.65) < 0.003
    assert found.baseline_runs == 5  # the window, not the whole history
    assert "iso_cts" in found.describe() and "62.0%" in found.describe()


def test_a_planted_slowdown_fires_and_a_small_absolute_one_does_not():
    slow = noisy_history() + night(7, {m: 0.65 for m in METHODS}, {"tsv_m": 10.0,
                                                                   "iso_cts": 16.0})
    (found,) = check(slow)
    assert (found.metric, found.method) == ("merge_seconds", "iso_cts")
    # +60% but only 0.6 s on a 1 s merge: below min_time_increase_s, timer noise.
    fast = [{**r, "merge_seconds": r["merge_seconds"] / 10} if "merge_seconds" in r else r
            for r in slow]
    assert check(fast) == []
    assert check(fast, Thresholds(min_time_increase_s=0.1))[0].method == "iso_cts"


def test_times_from_other_hardware_are_not_a_baseline():
    rows = noisy_history() + night(7, {m: 0.65 for m in METHODS}, {m: 30.0 for m in METHODS},
                                   hardware="cpu-b")
    assert check(rows) == []
    # Accuracy does not depend on the hardware: it is still compared.
    rows = noisy_history() + night(7, {m: 0.60 for m in METHODS}, {m: 30.0 for m in METHODS},
                                   hardware="cpu-b")
    assert {(r.metric, r.method) for r in check(rows)} == {("normalized_accuracy", m)
                                                           for m in METHODS}


def test_the_first_run_has_nothing_to_compare_with():
    assert check(night(0, {m: 0.1 for m in METHODS}, {m: 1e3 for m in METHODS})) == []


def test_per_task_drops_only_when_asked():
    rows = noisy_history() + night(7, {m: 0.65 for m in METHODS}, {m: 10.0 for m in METHODS},
                                   task_accuracy=0.5)
    assert check(rows) == []
    found = check(rows, Thresholds(max_task_accuracy_drop=5.0))
    assert {(r.task, r.method) for r in found} == {("digits", m) for m in METHODS}


def test_the_baseline_is_a_median_so_one_bad_night_does_not_move_it():
    rows = noisy_history()
    rows += night(7, {"tsv_m": 0.50, "iso_cts": 0.65}, {m: 10.0 for m in METHODS})  # bad night
    rows += night(8, {"tsv_m": 0.65, "iso_cts": 0.65}, {m: 10.0 for m in METHODS})  # recovered
    assert check(rows) == []


@pytest.mark.parametrize("bad", [{"max_accuracy_drop": -1}, {"window": 0},
                                 {"max_time_increase": float("nan")},
                                 {"max_task_accuracy_drop": -2}])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(InputError):
        Thresholds(**bad)
    with pytest.raises(InputError, match="thresholds"):
        Thresholds.from_mapping({"max_accuracy_dorp": 1}, "nightly.yaml")


def test_an_unknown_run_is_an_error():
    with pytest.raises(InputError, match="not in the history"):
        detect_regressions(make_table(noisy_history()), "nope", Thresholds())
