"""The nightly benchmark: a matrix of suites x task counts x methods, recorded and judged.

One nightly run is one run in the results history (one file, all cells), so a morning reader
either sees last night whole or not at all. A cell that fails is logged and reported but does
not stop the others: one broken method should not hide the rest of the night's numbers.

Exit codes (of `ray_jobs/nightly.py` and `merge-pipeline nightly`): 0 all good, 1 a regression
threshold was crossed, 2 bad configuration, 3 a cell of the matrix failed.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.bench.runner import (
    DEFAULT_METHODS,
    BenchOptions,
    bench_task_counts,
    format_table,
    run_bench,
)
from pipeline.engine.config import load_yaml
from pipeline.errors import InputError
from pipeline.history.regressions import Regression, Thresholds, detect_regressions
from pipeline.history.report import write_report
from pipeline.history.rows import RunContext, bench_rows
from pipeline.history.store import append_run, read_history
from pipeline.io import storage
from pipeline.io.output import write_json_atomic
from pipeline.methods.registry import get_method

EXIT_REGRESSION = 1
EXIT_CELL_FAILED = 3


@dataclass
class NightlyConfig:
    history: str
    report: str
    work_dir: str
    suites: list[str] | None = None  # default: ["standard"], or none when tasks_files given
    # Task manifests (the users' own tasks), benchmarked like suites; the fine-tuned
    # checkpoints and base come from each manifest.
    tasks_files: list[str] = field(default_factory=list)
    # None: each source's own (standard: the papers' 8, 14, 20; a manifest: all its tasks).
    task_counts: list[int | None] | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    early_stop: bool = False
    keep_task_vectors: bool = False
    engine: str = "ray"
    workers: int | None = None
    address: str | None = None
    device: str = "auto"
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.suites is None:
            self.suites = [] if self.tasks_files else ["standard"]

    def validate(self) -> None:
        for name in ("history", "report", "work_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"nightly config needs {name!r} (a path)")
        for name in ("suites", "tasks_files"):
            entries = getattr(self, name)
            if not isinstance(entries, list) or not all(isinstance(s, str) and s
                                                        for s in entries):
                raise InputError(f"{name} must be a list of names or paths, got {entries!r}")
        if not self.suites and not self.tasks_files:
            raise InputError("nothing to benchmark: give suites or tasks_files")
        if self.task_counts is not None and (not self.task_counts or not all(
                t is None or (isinstance(t, int) and t >= 1) for t in self.task_counts)):
            raise InputError(f"task_counts must be positive integers (null: all the suite's "
                             f"tasks), got {self.task_counts!r}")
        if not self.methods:
            raise InputError("methods must not be empty")
        for name in [*self.methods, *self.params]:
            get_method(name)  # unknown names fail before a night's work starts
        if self.engine not in ("ray", "local"):
            raise InputError(f"engine must be ray or local, got {self.engine!r}")


def load_nightly_config(path: str, **overrides: Any) -> NightlyConfig:
    """The YAML file's fields, then `overrides` (command-line flags; None means not given)."""
    values = dict(load_yaml(path)) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(NightlyConfig)}
    unknown = set(values) - known
    if unknown:
        raise InputError(f"{path}: unknown nightly fields {sorted(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    values["thresholds"] = Thresholds.from_mapping(values.get("thresholds"), path)
    try:
        config = NightlyConfig(**values)
    except TypeError as exc:
        raise InputError(f"{path}: {exc}") from None
    config.validate()
    return config


@dataclass
class NightlyResult:
    run_id: str
    history_file: str | None
    report: str
    cells: list[dict[str, Any]]
    regressions: list[Regression]
    failures: list[dict[str, str]]

    @property
    def exit_code(self) -> int:
        if self.failures:
            return EXIT_CELL_FAILED
        return EXIT_REGRESSION if self.regressions else 0


def run_nightly(config: NightlyConfig, log: Callable[[str], None] = print) -> NightlyResult:
    config.validate()
    ctx = RunContext(kind="bench")
    run_dir = storage.join(config.work_dir, ctx.run_id)
    log(f"nightly run {ctx.run_id} (commit {ctx.git_commit[:12]}): "
        f"{len(config.suites or []) + len(config.tasks_files)} suite(s) x "
        f"{len(config.task_counts) if config.task_counts else 'default'} task count(s) x "
        f"{len(config.methods)} method(s)")
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    sources = [(s, None) for s in config.suites or []] + [(None, f) for f in config.tasks_files]

    def failed(label: str, exc: Exception) -> None:  # one failed cell must not end the night
        log(traceback.format_exc())
        failures.append({"cell": label, "error": f"{type(exc).__name__}: {exc}"})

    for suite, tasks_file in sources:
        name = os.path.splitext(storage.parent_and_name(tasks_file)[1])[0] if tasks_file \
            else os.path.basename(os.path.normpath(str(suite)))
        try:
            counts = config.task_counts or bench_task_counts(suite, tasks_file)
        except Exception as exc:  # noqa: BLE001
            failed(f"{name}-T(default)", exc)
            continue
        for count in counts:
            label = f"{name}-T{count or 'all'}"
            out = storage.join(run_dir, label)
            log(f"[{label}]")
            try:
                summary = run_bench(BenchOptions(
                    suite=suite, tasks_file=tasks_file, tasks=count,
                    methods=config.methods, out=out,
                    engine=config.engine, workers=config.workers, address=config.address,
                    device=config.device, early_stop=config.early_stop, cache=config.cache,
                    params=config.params), log)
            except Exception as exc:  # noqa: BLE001
                failed(label, exc)
                continue
            if not config.keep_task_vectors:
                storage.remove_tree(storage.join(out, "task_vectors"))
            log(format_table(summary))
            rows += bench_rows(ctx, summary)
            cells.append({"cell": label, "out": out,
                          "total_seconds": summary.timings_s["total"]})
    history_file = append_run(config.history, rows) if rows else None
    history = read_history(config.history)
    regressions = (detect_regressions(history, ctx.run_id, config.thresholds)
                   if history_file else [])
    write_report(history, config.report, config.thresholds, regressions_of_latest=regressions,
                 failures=failures)
    result = NightlyResult(ctx.run_id, history_file, config.report, cells, regressions,
                           failures)
    storage.make_dirs(run_dir)
    write_json_atomic(storage.join(run_dir, "nightly.json"), {
        "run_id": ctx.run_id, "git_commit": ctx.git_commit, "history_file": history_file,
        "report": config.report, "cells": cells, "failures": failures,
        "regressions": [r.to_dict() for r in regressions], "exit_code": result.exit_code})
    for r in regressions:
        log(f"REGRESSION: {r.describe()}")
    for f in failures:
        log(f"FAILED: {f['cell']}: {f['error']}")
    log(f"history: {history_file or '(nothing recorded)'}; report: {config.report}")
    return result
