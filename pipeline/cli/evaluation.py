"""The evaluation subcommands of `merge-pipeline`: suite, evaluate, sweep, bench."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from pipeline.cli.ops import add_cache_option, add_history_option, record
from pipeline.engine.config import ClusterOptions, add_options, cluster_options
from pipeline.errors import InputError


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    add_options(p, ClusterOptions)
    add_cache_option(p)


def _add_recording_options(p: argparse.ArgumentParser) -> None:
    _add_cluster_options(p)
    add_history_option(p)


def _task_counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive task counts, comma-separated "
                                         f"(e.g. 8,14,20), got {value!r}")
    return counts


def _add_suite_options(p: argparse.ArgumentParser, models: bool = True,
                       counts: bool = False) -> None:
    p.add_argument("--suite", help="built-in suite name (standard, tiny) or a built suite's "
                                   "directory (default: standard, unless --tasks-file)")
    if counts:
        p.add_argument("--tasks", type=_task_counts, metavar="T[,T...]",
                       help="benchmark the first T tasks, for each T given (default: the "
                            "suite's task counts, standard: 8,14,20; a manifest: all tasks)")
    else:
        p.add_argument("--tasks", type=int, help="use the first N tasks (default: all)")
    if not models:
        return
    p.add_argument("--tasks-file", help="a task manifest (YAML): your tasks' data, splits and "
                                        "heads, instead of a built-in suite")
    p.add_argument("--base", help="theta_0 (default: the manifest's `base`)")
    p.add_argument("--finetuned", action="extend", nargs="+", metavar="CHECKPOINT",
                   help="one fine-tuned checkpoint per task, in the manifest's order "
                        "(default: each task's `finetuned`)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="evaluation precision; bf16 autocast needs a GPU")


def add_parsers(sub: Any) -> None:
    suite = sub.add_parser("suite", help="build (or find in the cache) a benchmark suite and "
                                         "print its directory")
    _add_suite_options(suite, models=False)
    _add_cluster_options(suite)
    suite.set_defaults(func=cmd_suite)

    evaluate = sub.add_parser("evaluate", help="accuracy of a model on a suite's tasks")
    _add_suite_options(evaluate)
    evaluate.add_argument("--model", help="a CLIP vision model directory (default: the suite's "
                                          "pre-trained model)")
    evaluate.add_argument("--task-vector", help="evaluate theta_0 + alpha * this task vector")
    evaluate.add_argument("--alpha", type=float, default=1.0)
    evaluate.add_argument("--split", choices=["val", "test"], default="test")
    evaluate.add_argument("--json", help="also write the result to this JSON file")
    _add_recording_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = sub.add_parser("sweep", help="alpha search for a merged task vector "
                                         "(validation), then test at the chosen alpha")
    _add_suite_options(sweep)
    sweep.add_argument("--task-vector", required=True,
                       help="output of `merge --output task_vector` on the suite's checkpoints")
    sweep.add_argument("--method", help="take the method's grid (default grid: 0.1..3.0)")
    sweep.add_argument("--grid", help="comma-separated alphas instead of the method's grid")
    sweep.add_argument("--early-stop", action="store_true",
                       help="stop after 3 alphas without a better mean validation accuracy")
    sweep.add_argument("--json", help="also write the result to this JSON file")
    _add_recording_options(sweep)
    sweep.set_defaults(func=cmd_sweep)

    bench = sub.add_parser("bench", help="build the suite, merge with each method, search "
                                         "alpha, write summary.json/.parquet/.md")
    _add_suite_options(bench, counts=True)
    bench.add_argument("--methods", default=None,
                       help="comma-separated (default: average,task_arithmetic,ties,tsv_m,"
                            "iso_c,iso_cts)")
    bench.add_argument("--out", required=True)
    bench.add_argument("--early-stop", action="store_true")
    bench.add_argument("--overwrite", action="store_true")
    bench.add_argument("--param", action="append", default=[], metavar="METHOD:NAME=VALUE",
                       help="a method parameter, e.g. iso_cts:common_space_fraction=0.8")
    _add_recording_options(bench)
    bench.set_defaults(func=cmd_bench)

    regime = sub.add_parser("regime", help="is merging possible on these fine-tunes? task-vector "
                                           "geometry and cross-task interference")
    _add_suite_options(regime)
    regime.add_argument("--split", choices=["val", "test"], default="val")
    regime.add_argument("--json", help="also write the report to this JSON file")
    _add_cluster_options(regime)
    regime.set_defaults(func=cmd_regime)


def _executor(cluster: ClusterOptions):
    if cluster.actor_engine != "ray":
        return None
    from pipeline.runtime.executors import RayExecutor
    return RayExecutor(cluster.address, cluster.workers, device=cluster.device)


def _task_set(args, cluster: ClusterOptions, log=print):
    from pipeline.bench.runner import open_task_set
    return open_task_set(args.suite, args.tasks_file, args.tasks, args.cache,
                         _executor(cluster), args.base, args.finetuned, log)


def _pool_for(cluster: ClusterOptions, task_set, precision: str):
    return task_set.pool(cluster.actor_engine, cluster.workers, cluster.device,
                         cluster.address, precision)


def cmd_suite(args) -> int:
    from pipeline.bench.suites.build import ensure_suite
    from pipeline.bench.suites.export import MANIFEST_NAME
    from pipeline.evaluation.manifest import load_manifest
    cluster = cluster_options(vars(args))
    suite_dir = ensure_suite(args.suite or "standard", args.cache, _executor(cluster))
    manifest = load_manifest(os.path.join(suite_dir, MANIFEST_NAME))
    print(suite_dir)
    print(f"tasks: {', '.join(s.name for s in manifest.select(args.tasks))}")
    print(f"manifest: {manifest.location}")
    return 0


def cmd_evaluate(args) -> int:
    from pipeline.bench.runner import accuracies, reference_rows
    from pipeline.evaluation.search import absolute, normalized
    from pipeline.models.weights import Weights
    cluster = cluster_options(vars(args))
    if args.model and args.task_vector:
        raise InputError("give --model or --task-vector (with --alpha), not both")
    weights = (Weights.model(args.model) if args.model else
               Weights.delta(args.task_vector, args.alpha) if args.task_vector else
               Weights.base())
    task_set = _task_set(args, cluster)
    tasks = task_set.task_names
    pool = _pool_for(cluster, task_set, args.precision)
    t0 = time.perf_counter()
    try:
        acc = accuracies(pool, [weights], tasks, args.split, "evaluate")[0]
        known = reference_rows(pool, task_set)["finetuned"].get(args.split, {})
    finally:
        pool.close()
    # Normalised accuracy divides by the fine-tuned accuracy: only where every task has one.
    finetuned = known if all(known.get(t, 0) > 0 for t in tasks) else None
    result = {"weights": weights.describe(), "split": args.split, "accuracy": acc,
              "absolute": absolute(acc),
              "normalized": normalized(acc, finetuned) if finetuned else None,
              "finetuned": finetuned, "manifest": task_set.manifest.location,
              "manifest_digest": task_set.manifest.digest}
    for t in tasks:
        reference = f"   (fine-tuned {100 * known[t]:.1f}%)" if t in known else ""
        print(f"{t:14s} {100 * acc[t]:6.1f}%{reference}")
    norm = f"   normalized {100 * result['normalized']:.1f}%" if finetuned else ""
    print(f"{'mean':14s} {100 * result['absolute']:6.1f}%{norm}")
    _maybe_write(args.json, result)
    from pipeline.history.rows import evaluation_rows
    record(args.history, "evaluate", lambda ctx: evaluation_rows(
        ctx, task_set, weights.describe(), args.split,
        args.alpha if args.task_vector else None, acc, finetuned, time.perf_counter() - t0))
    return 0


def cmd_sweep(args) -> int:
    from pipeline.bench.runner import finetuned_reference, reference_rows, sweep_task_vector
    from pipeline.evaluation.search import normalized
    from pipeline.methods.registry import SVD_ALPHA_GRID, get_method
    if args.grid:
        try:
            grid = tuple(float(a) for a in args.grid.split(","))
        except ValueError:
            raise InputError(f"--grid must be comma-separated numbers, got {args.grid!r}") from None
        if any(not 0 < a < float("inf") for a in grid):
            raise InputError("--grid alphas must be finite and > 0")
    else:
        grid = get_method(args.method).alpha_grid if args.method else SVD_ALPHA_GRID
        if not grid:
            raise InputError(f"method {args.method!r} fixes alpha; nothing to sweep")
    cluster = cluster_options(vars(args))
    task_set = _task_set(args, cluster)
    pool = _pool_for(cluster, task_set, args.precision)
    t0 = time.perf_counter()
    try:
        refs = reference_rows(pool, task_set)
        ft_val = finetuned_reference(refs, task_set, "val")
        ft_test = finetuned_reference(refs, task_set, "test")
        result = sweep_task_vector(pool, args.task_vector, task_set.task_names, grid, ft_val,
                                   args.early_stop)
    finally:
        pool.close()
    result["test_normalized"] = normalized(result["test"], ft_test)
    print(f"chosen alpha {result['alpha']:g} (of {len(result['sweep'])} evaluated); test "
          f"normalized accuracy {100 * result['test_normalized']:.1f}%")
    _maybe_write(args.json, result)
    from pipeline.history.rows import evaluation_rows
    record(args.history, "sweep", lambda ctx: evaluation_rows(
        ctx, task_set, args.method or args.task_vector, "test", result["alpha"],
        result["test"], ft_test, time.perf_counter() - t0))
    return 0


def cmd_regime(args) -> int:
    import tempfile

    from pipeline.bench.regime import format_regime, regime_report, task_vector_geometry
    from pipeline.bench.runner import merge_inputs, reference_rows
    from pipeline.io import storage
    from pipeline.models.weights import Weights
    cluster = cluster_options(vars(args))
    task_set = _task_set(args, cluster)
    tasks, models = task_set.task_names, task_set.finetuned_checkpoints()
    with tempfile.TemporaryDirectory(prefix="merge-pipeline-regime-") as work:
        base, finetuned = merge_inputs(task_set, storage.join(work, "inputs"))
        geometry = task_vector_geometry(base, finetuned)
    pool = _pool_for(cluster, task_set, args.precision)
    try:
        refs = reference_rows(pool, task_set)
        pairs = [(t, j) for j in range(len(tasks)) for t in tasks if t != tasks[j]]
        counts = pool.counts([(Weights.model(models[j]), t, args.split) for t, j in pairs],
                             "cross-task")
    finally:
        pool.close()
    cross = {(t, tasks[j]): c / n for (t, j), (c, n) in zip(pairs, counts)}
    report = regime_report(tasks, geometry, refs["zero_shot"][args.split],
                           refs["finetuned"][args.split], cross, args.split)
    print(format_regime(report))
    _maybe_write(args.json, report.model_dump())
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench.runner import (
        DEFAULT_METHODS,
        BenchOptions,
        bench_task_counts,
        format_table,
        refuse_existing_output,
        run_bench,
    )
    from pipeline.engine.config import parse_params
    from pipeline.io import storage
    params: dict[str, dict[str, Any]] = {}
    for item in args.param:
        method, sep, assignment = item.partition(":")
        if not sep:
            raise InputError(f"--param must look like METHOD:NAME=VALUE, got {item!r}")
        params.setdefault(method, {}).update(parse_params([assignment]))
    methods = tuple(m for m in args.methods.split(",") if m) if args.methods else DEFAULT_METHODS
    cluster = cluster_options(vars(args))
    counts = bench_task_counts(args.suite, args.tasks_file, args.tasks)
    # Several task counts: one output directory each, T<count>, under --out. All are checked
    # before the first runs.
    outs = [args.out] if len(counts) == 1 else \
        [storage.join(args.out, f"T{count}") for count in counts]
    for out in outs:
        refuse_existing_output(out, args.overwrite)
    summaries = []
    for count, out in zip(counts, outs):
        summary = run_bench(BenchOptions(
            suite=args.suite, tasks_file=args.tasks_file, base=args.base,
            finetuned=args.finetuned or (), precision=args.precision,
            tasks=count, methods=methods, out=out,
            engine=cluster.actor_engine, workers=cluster.workers, address=cluster.address,
            device=cluster.device, early_stop=args.early_stop, cache=args.cache,
            overwrite=args.overwrite, params=params))
        print(f"T={summary.num_tasks}")
        print(format_table(summary))
        print(f"wrote {out}/summary.json, summary.parquet, summary.md "
              f"({summary.timings_s['total']:.0f} s)")
        summaries.append(summary)
    from pipeline.history.rows import bench_rows
    record(args.history, "bench",
           lambda ctx: [row for s in summaries for row in bench_rows(ctx, s)])
    return 0


def _maybe_write(path: str | None, result: dict) -> None:
    if path:
        from pipeline.io.output import write_json_atomic
        write_json_atomic(path, result)
        print(f"wrote {path}")
