"""The operations subcommands of `merge-pipeline`: nightly and report, and `--history` for the
commands that record their results."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pipeline.engine.config import ClusterOptions, add_options, cluster_options, load_yaml
from pipeline.errors import InputError


def add_history_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", help="append this run's results to the results history at "
                                     "this path or pyarrow.fs URI (a parquet dataset "
                                     "partitioned by date)")


def add_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="where built suites are kept (default: "
                                   "$MERGE_PIPELINE_CACHE or ~/.cache/merge-pipeline)")


def record(history: str | None, kind: str, rows_for: Callable[[Any], list[dict]]) -> None:
    """Append the rows `rows_for(context)` builds, when the user asked for a history."""
    if not history:
        return
    from pipeline.history.rows import RunContext
    from pipeline.history.store import append_run
    path = append_run(history, rows_for(RunContext(kind=kind)))
    print(f"recorded in {path}")


def add_parsers(sub: Any) -> None:
    nightly = sub.add_parser("nightly", help="run the nightly benchmark matrix, record it in "
                                             "the history, write the report, exit 1 on a "
                                             "regression")
    nightly.add_argument("--config", help="nightly YAML (see cluster/nightly.yaml)")
    add_history_option(nightly)
    nightly.add_argument("--report", help="where to write the HTML report")
    nightly.add_argument("--work-dir", help="where each run's bench outputs go")
    nightly.add_argument("--suites", help="comma-separated suite names or directories")
    nightly.add_argument("--tasks-file", action="extend", nargs="+", dest="tasks_files",
                         metavar="MANIFEST", help="task manifest(s) to benchmark as well as "
                                                  "(or, without --suites, instead of) suites")
    nightly.add_argument("--tasks", help="comma-separated task counts")
    nightly.add_argument("--methods", help="comma-separated methods")
    add_options(nightly, ClusterOptions)
    add_cache_option(nightly)
    nightly.set_defaults(func=cmd_nightly)

    report = sub.add_parser("report", help="write a self-contained HTML report of the history")
    report.add_argument("--history", required=True, help="results history path or URI")
    report.add_argument("--out", required=True, help="HTML file to write")
    report.add_argument("--config", help="nightly YAML whose thresholds to apply "
                                          "(default thresholds otherwise)")
    report.set_defaults(func=cmd_report)


def _csv(value: str | None, cast=str) -> list | None:
    return None if value is None else [cast(v) for v in value.split(",") if v]


def cmd_nightly(args: argparse.Namespace) -> int:
    from pipeline.history.nightly import load_nightly_config, run_nightly
    try:
        tasks = _csv(args.tasks, int)
    except ValueError:
        raise InputError(f"--tasks must be comma-separated integers, got {args.tasks!r}") from None
    cluster = cluster_options(vars(args))  # validated; only the flags given override the file
    given = cluster.model_dump(include={k for k in ClusterOptions.model_fields
                                        if getattr(args, k) is not None})
    if "engine" in given:
        given["engine"] = cluster.actor_engine
    config = load_nightly_config(
        args.config, history=args.history, report=args.report, work_dir=args.work_dir,
        suites=_csv(args.suites), tasks_files=args.tasks_files, task_counts=tasks,
        methods=_csv(args.methods),
        cache=args.cache, **given)
    return run_nightly(config).exit_code


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.history.regressions import Thresholds
    from pipeline.history.report import write_report
    from pipeline.history.store import read_history
    thresholds = Thresholds()
    if args.config:
        thresholds = Thresholds.from_mapping(load_yaml(args.config).get("thresholds"),
                                             args.config)
    history = read_history(args.history)
    print(write_report(history, args.out, thresholds))
    return 0
