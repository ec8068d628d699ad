"""What each kind of run records in the results history (see `results.ROW_SCHEMA`).

A run's identity (id, time, commit, hardware) is taken once per run (the nightly takes it when
it starts, single commands when they record), so all its rows agree and the history can be
grouped by run.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.bench.runner import BenchSummary, TaskSet
from pipeline.engine.records import MergeReport
from pipeline.history.store import MEAN, git_commit, hardware, new_run_id, params_json


@dataclass(frozen=True)
class RunContext:
    kind: str
    run_id: str = ""
    timestamp: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    git_commit: str = field(default_factory=git_commit)
    hardware: str = field(default_factory=hardware)

    def __post_init__(self) -> None:
        if not self.run_id:
            object.__setattr__(self, "run_id", new_run_id(self.timestamp))

    def row(self, **values: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "timestamp": self.timestamp, "kind": self.kind,
                "git_commit": self.git_commit, "hardware": self.hardware, **values}


def _accuracy_rows(ctx: RunContext, common: dict[str, Any], test: dict[str, float],
                   finetuned: dict[str, float] | None) -> list[dict[str, Any]]:
    """One row per task and one mean row; normalized only where fine-tuned accuracy is known."""
    rows = [ctx.row(**common, task=t, accuracy=a,
                    normalized_accuracy=a / finetuned[t] if finetuned else None)
            for t, a in test.items()]
    mean = sum(test.values()) / len(test)
    norm = (sum(a / finetuned[t] for t, a in test.items()) / len(test)) if finetuned else None
    rows.append(ctx.row(**common, task=MEAN, accuracy=mean, normalized_accuracy=norm))
    return rows


def bench_rows(ctx: RunContext, summary: BenchSummary) -> list[dict[str, Any]]:
    """Every method's (and the zero-shot and fine-tuned references') test accuracy, with the
    method's merge and sweep times."""
    model = _model_name(summary.suite_dir)
    finetuned = {t: v.absolute for t, v in summary.rows["finetuned"].per_task.items()}
    rows = []
    for method, row in summary.rows.items():
        merge = summary.merges.get(method)
        common = {"method": method, "params": params_json(merge.params if merge else None),
                  "suite": summary.suite, "manifest_digest": summary.manifest_digest,
                  "model": model,
                  "model_params": merge.model_parameters if merge else None,
                  "num_tasks": summary.num_tasks, "alpha": row.alpha, "split": "test",
                  "merge_seconds": merge.seconds if merge else None,
                  "eval_seconds": summary.timings_s.get(f"sweep_{method}"),
                  "peak_memory_bytes": merge.peak_rss_bytes if merge else None}
        test = {t: v.absolute for t, v in row.per_task.items()}
        rows += _accuracy_rows(ctx, common, test, finetuned)
    return rows


def merge_rows(ctx: RunContext, report: MergeReport, base: str) -> list[dict[str, Any]]:
    return [ctx.row(method=report.method, params=params_json(report.params),
                    model=base, model_params=report.model.parameters,
                    num_tasks=report.num_tasks, alpha=report.alpha,
                    merge_seconds=report.timings_s["total"],
                    peak_memory_bytes=report.engine.peak_worker_rss_bytes)]


def evaluation_rows(ctx: RunContext, task_set: TaskSet, method: str, split: str,
                    alpha: float | None, accuracy: dict[str, float],
                    finetuned: dict[str, float] | None, eval_seconds: float
                    ) -> list[dict[str, Any]]:
    """`evaluate` and `sweep` results: per-task accuracy of one set of weights."""
    common = {"method": method, "params": params_json(None), "suite": task_set.name,
              "manifest_digest": task_set.manifest.digest,
              "model": _model_name(task_set.manifest.location),
              "num_tasks": len(accuracy), "alpha": alpha, "split": split,
              "eval_seconds": eval_seconds}
    return _accuracy_rows(ctx, common, accuracy, finetuned)


def _model_name(manifest_location: str) -> str:
    """What a run measured, in a word: the directory holding its manifest (a built-in suite's
    build directory names its spec's digest)."""
    return os.path.basename(os.path.dirname(os.path.normpath(manifest_location)))
