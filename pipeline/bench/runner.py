"""The benchmark: build the suite, merge with each method, search alpha, report accuracies.

Per method the merged task vector is computed once (`--output task_vector` of the merge
engine); the alpha search only rescales it inside the evaluators. Rows are written as JSON
(summary.json) and as a flat parquet table (one row per method x task x split), so nightly
runs can be appended to a history and compared.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pipeline.bench.suites.build import (
    ensure_suite,
    is_built_suite,
    shared_suite_dir,
    suite_task_counts,
)
from pipeline.bench.suites.export import MANIFEST_NAME
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import library_versions, run_merge
from pipeline.engine.records import VersionedFile
from pipeline.errors import InputError
from pipeline.evaluation.manifest import LoadedManifest, load_manifest
from pipeline.evaluation.pool import EvaluationPool
from pipeline.evaluation.search import absolute, normalized, select_alpha
from pipeline.evaluation.tasks import SPLITS, EvalTask, resolve_task, task_errors
from pipeline.io import storage
from pipeline.io.output import write_file_atomic, write_json_atomic
from pipeline.io.reader import open_checkpoint
from pipeline.io.safetensors_io import write_safetensors
from pipeline.methods.registry import MethodSpec, get_method
from pipeline.models.loading import PROJECTION_KEY, LoadedVision, load_vision
from pipeline.models.weights import Weights
from pipeline.runtime.executors import RayExecutor

# TSV-C is a compression method (one rebuilt model per task), not a merge: not in the table.
DEFAULT_METHODS = ("average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")


class TaskScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    absolute: float
    normalized: float


class MethodRow(BaseModel):
    """One line of the benchmark table: a method (or a reference) at its chosen alpha."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float | None
    absolute: float
    normalized: float
    per_task: dict[str, TaskScore]


class MergeCost(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    params: dict[str, Any]
    seconds: float
    model_parameters: int
    peak_rss_bytes: int | None


class BenchSummary(VersionedFile):
    """`summary.json`: the benchmark's rows, sweeps and costs (read by history and nightly)."""

    suite: str
    suite_dir: str  # the manifest's location (a built-in suite's exported manifest)
    manifest_digest: str
    tasks: list[str]
    num_tasks: int
    rows: dict[str, MethodRow]
    sweeps: dict[str, list[dict[str, Any]]]
    merges: dict[str, MergeCost]
    evaluation: dict[str, Any]
    early_stop: bool
    timings_s: dict[str, float]
    versions: dict[str, str]


@dataclass
class BenchOptions:
    suite: str | None = None        # a built-in suite's name or directory (default: standard)
    tasks_file: str | None = None   # a task manifest instead of a built-in suite
    base: str | None = None         # override the manifest's base
    finetuned: Sequence[str] = ()   # override the manifest's fine-tuned checkpoints
    precision: str = "fp32"
    tasks: int | None = None
    methods: Sequence[str] = DEFAULT_METHODS
    out: str = "bench-out"
    engine: str = "ray"
    workers: int | None = None
    address: str | None = None
    device: str = "auto"
    early_stop: bool = False
    cache: str | None = None
    overwrite: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSet:
    """What a benchmark runs on: a manifest's tasks (a built-in suite exports one), theta_0,
    and per task its fine-tuned checkpoint."""

    name: str
    manifest: LoadedManifest
    base: str
    tasks: list[EvalTask]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def pool(self, engine: str, workers: int | None, device: str, address: str | None,
             precision: str = "fp32") -> EvaluationPool:
        return EvaluationPool(self.base, self.tasks, engine, workers, device, address=address,
                              preprocess=self.manifest.manifest.preprocess, precision=precision)

    def finetuned_checkpoints(self) -> list[str]:
        missing = [t.name for t in self.tasks if t.finetuned is None]
        if missing:
            raise InputError(f"{self.manifest.location}: task {missing[0]!r} has no "
                             f"`finetuned` checkpoint to merge (or pass --finetuned, one per "
                             f"task)")
        return [str(t.finetuned) for t in self.tasks]


def bench_task_counts(suite: str | None, tasks_file: str | None,
                      requested: Sequence[int] | None = None) -> list[int | None]:
    """The task counts a bench runs, every one checked against the tasks there are before any
    work (a count too large must not fail after the smaller ones ran). Without `requested`: a
    built-in suite's own counts (standard: the papers' 8, 14 and 20), named or by its built
    directory (its suite.json records them); a manifest: all its tasks (None)."""
    own: Sequence[int] = ()
    if tasks_file is not None:
        available, where = len(load_manifest(tasks_file).manifest.tasks), tasks_file
    else:
        name = suite or "standard"
        available, own = suite_task_counts(name)
        where = name if is_built_suite(name) else f"suite {name!r}"
    for count in requested or ():
        if not 1 <= count <= available:
            raise InputError(f"--tasks must be between 1 and {available} for {where}, "
                             f"got {count}")
    counts: list[int | None] = list(requested or own) or [None]
    return counts


def open_task_set(suite: str | None = None, tasks_file: str | None = None,
                  count: int | None = None, cache: str | None = None, executor=None,
                  base: str | None = None, finetuned: Sequence[str] | None = None,
                  log: Callable[[str], None] = print) -> TaskSet:
    """A built-in suite (built or taken from the cache, then read through the manifest it
    exports) or a user's manifest; `base` / `finetuned` override the manifest's models."""
    if suite and tasks_file:
        raise InputError("give --suite or --tasks-file, not both")
    if tasks_file is not None:
        loaded = load_manifest(tasks_file)
        name = os.path.splitext(storage.parent_and_name(tasks_file)[1])[0]
    else:
        suite_dir = ensure_suite(suite or "standard", cache, executor, log)
        if not os.path.isfile(os.path.join(suite_dir, MANIFEST_NAME)):
            raise InputError(f"{suite_dir}: a suite built by an older version (no "
                             f"{MANIFEST_NAME}); pass the suite's name to build it again")
        # With a shared cache, the suite's models and data are read where every node can.
        home = shared_suite_dir(suite or "standard", cache) or suite_dir
        loaded = load_manifest(storage.join(home, MANIFEST_NAME))
        name = suite or "standard"
    specs = loaded.select(count)
    if finetuned:
        if len(finetuned) != len(specs):
            raise InputError(f"--finetuned: {len(finetuned)} checkpoint(s) for {len(specs)} "
                             f"task(s) ({', '.join(s.name for s in specs)}); give one per "
                             f"task, in the manifest's order")
        specs = [s.model_copy(update={"finetuned": f}) for s, f in zip(specs, finetuned)]
    theta0 = base or loaded.manifest.base
    if theta0 is None:
        raise InputError(f"{loaded.location}: no base model; set `base` in the manifest or "
                         f"pass --base")
    log(f"tasks: {', '.join(s.name for s in specs)} ({loaded.location})")
    tasks = [resolve_task(loaded.manifest, spec) for spec in specs]
    return TaskSet(name, loaded, theta0, tasks)


def accuracies(pool: EvaluationPool, weights: Sequence[Weights], tasks: Sequence[str],
               split: str, desc: str) -> list[dict[str, float]]:
    """Per weights, per task accuracy on `split`; one pool call for everything."""
    requests = [(w, t, split) for w in weights for t in tasks]
    counts = iter(pool.counts(requests, desc))
    return [{t: (lambda c: c[0] / c[1])(next(counts)) for t in tasks} for _ in weights]


def reference_rows(pool: EvaluationPool, task_set: TaskSet
                   ) -> dict[str, dict[str, dict[str, float]]]:
    """Zero-shot (theta_0) and fine-tuned (theta_t on task t) accuracy, val and test. A task's
    stated `finetuned_accuracy` stands in for evaluating its checkpoint; a task with neither
    has no fine-tuned row (and no normalised accuracy)."""
    refs: dict[str, dict[str, dict[str, float]]] = {"zero_shot": {}, "finetuned": {}}
    requests = [(Weights.base(), t.name, s) for s in SPLITS for t in task_set.tasks]
    requests += [(Weights.model(t.finetuned), t.name, s) for s in SPLITS
                 for t in task_set.tasks if t.finetuned and t.finetuned_accuracy is None]
    counts = pool.counts(requests, "references")
    for (weights, task, split), (c, n) in zip(requests, counts):
        row = "zero_shot" if weights.kind == "base" else "finetuned"
        refs[row].setdefault(split, {})[task] = c / n
    for t in task_set.tasks:
        for split, value in (t.finetuned_accuracy or {}).items():
            refs["finetuned"].setdefault(split, {})[t.name] = value
    return refs


def finetuned_reference(refs: dict[str, dict[str, dict[str, float]]], task_set: TaskSet,
                        split: str) -> dict[str, float]:
    """The fine-tuned accuracies normalisation divides by; every task needs one."""
    known = refs["finetuned"].get(split, {})
    for t in task_set.tasks:
        if t.name not in known:
            raise InputError(f"task {t.name!r}: normalised accuracy needs the task's "
                             f"`finetuned` checkpoint or its `finetuned_accuracy` in "
                             f"{task_set.manifest.location}")
        if known[t.name] <= 0:
            raise InputError(f"task {t.name!r}: the fine-tuned model scores 0 on the {split} "
                             f"split, so normalised accuracy (divided by it) is undefined; "
                             f"check the task's head and labels")
    return {t.name: known[t.name] for t in task_set.tasks}


def sweep_task_vector(pool: EvaluationPool, task_vector: str, tasks: Sequence[str],
                      grid: Sequence[float], finetuned_val: dict[str, float],
                      early_stop: bool) -> dict[str, Any]:
    """Alpha search on validation, then one test evaluation at the chosen alpha."""
    def validate(alphas: list[float]) -> list[dict[str, float]]:
        return accuracies(pool, [Weights.delta(task_vector, a) for a in alphas], tasks, "val",
                          f"sweep {len(alphas)} alpha(s)")
    search = select_alpha(grid, validate, finetuned_val, early_stop, wave=pool.workers)
    test = accuracies(pool, [Weights.delta(task_vector, search.alpha)], tasks, "test",
                      f"test alpha={search.alpha:g}")[0]
    return {"alpha": search.alpha, "test": test, "sweep": search.evaluated,
            "stopped_early": search.stopped_early}


def refuse_existing_output(out: str, overwrite: bool) -> None:
    if storage.exists(out) and not overwrite:
        raise InputError(f"{out}: output already exists (pass --overwrite)")


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> BenchSummary:
    t_start = time.perf_counter()
    methods = [get_method(m) for m in options.methods]  # unknown names fail before any work
    for m in methods:
        if m.kind == "compress":
            raise InputError(f"method {m.name!r} compresses per task; it has no merged model "
                             f"to benchmark")
    refuse_existing_output(options.out, options.overwrite)
    executor = None
    if options.engine == "ray":
        executor = RayExecutor(options.address, options.workers, device=options.device)
    task_set = open_task_set(options.suite, options.tasks_file, options.tasks, options.cache,
                             executor, options.base, options.finetuned, log)
    timings: dict[str, float] = {}
    # Merges first, then the actors: evaluation actors hold their CPUs/GPUs for their whole
    # life, and merge tasks queued behind them would wait forever on a small cluster.
    task_vectors, merges = _merge_methods(options, methods, task_set, executor, timings)
    pool = task_set.pool(options.engine, options.workers, options.device, options.address,
                         options.precision)
    try:
        rows, sweeps = _sweep_methods(pool, options, methods, task_set, task_vectors, timings,
                                      log)
    finally:
        pool.close()
    timings["total"] = time.perf_counter() - t_start
    summary = BenchSummary(suite=task_set.name, suite_dir=task_set.manifest.location,
                           manifest_digest=task_set.manifest.digest,
                           tasks=task_set.task_names, num_tasks=len(task_set.tasks), rows=rows,
                           sweeps=sweeps, merges=merges, evaluation=pool.describe(),
                           early_stop=options.early_stop, timings_s=timings,
                           versions=library_versions())
    write_results(options.out, summary)
    return summary


def _merge_methods(options: BenchOptions, methods: list[MethodSpec], task_set: TaskSet,
                   executor, timings: dict[str, float]
                   ) -> tuple[dict[str, str], dict[str, MergeCost]]:
    """Each method's merged task vector (computed once; the sweep only rescales it)."""
    inputs = storage.join(options.out, "inputs")
    base, finetuned = merge_inputs(task_set, inputs)
    task_vectors, merges = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        task_vectors[method.name] = storage.join(storage.join(options.out, "task_vectors"),
                                                 method.name)
        report = run_merge(MergeConfig(base=base, finetuned=finetuned, method=method.name,
                                       out=task_vectors[method.name], output="task_vector",
                                       engine=options.engine, workers=options.workers,
                                       address=options.address, device=options.device,
                                       overwrite=True,
                                       params=options.params.get(method.name, {})),
                           executor=executor)
        timings[f"merge_{method.name}"] = time.perf_counter() - t0
        merges[method.name] = MergeCost(params=report.params,
                                        seconds=timings[f"merge_{method.name}"],
                                        model_parameters=report.model.parameters,
                                        peak_rss_bytes=report.engine.peak_worker_rss_bytes)
    storage.remove_tree(inputs)
    return task_vectors, merges


def merge_inputs(task_set: TaskSet, work: str) -> tuple[str, list[str]]:
    """The base and fine-tuned checkpoints as the merge engine takes them: as they are when
    they share one key set; otherwise canonical copies under `work` (Hugging Face
    `CLIPVisionModelWithProjection` keys), since users mix layouts: FusionBench's base is a full
    CLIPModel and its fine-tunes are CLIPVisionModels without projection (they keep the base's),
    and the papers' fine-tunes are open_clip state dicts."""
    base, finetuned = task_set.base, task_set.finetuned_checkpoints()
    key_sets = []
    for location in (base, *finetuned):
        with open_checkpoint(location) as ckpt:
            key_sets.append(set(ckpt.keys()))
    if all(keys == key_sets[0] for keys in key_sets):
        return base, finetuned
    theta0 = load_vision(base)
    copies = [_write_canonical(storage.join(work, "base"), theta0)]
    for task, location in zip(task_set.tasks, finetuned):
        with task_errors(task.name):
            loaded = load_vision(location, theta0.config, theta0.tensors[PROJECTION_KEY])
        copies.append(_write_canonical(storage.join(work, task.name), loaded))
    return copies[0], copies[1:]


def _write_canonical(directory: str, loaded: LoadedVision) -> str:
    storage.make_dirs(directory)
    write_safetensors(storage.join(directory, "model.safetensors"),
                      {k: v.contiguous() for k, v in loaded.tensors.items()})
    write_json_atomic(storage.join(directory, "config.json"), loaded.config.to_hf_dict())
    return directory


def _sweep_methods(pool: EvaluationPool, options: BenchOptions, methods: list[MethodSpec],
                   task_set: TaskSet, task_vectors: dict[str, str],
                   timings: dict[str, float], log: Callable[[str], None]
                   ) -> tuple[dict[str, MethodRow], dict[str, list[dict[str, Any]]]]:
    """The reference rows, then each method at the alpha its validation sweep chooses."""
    t0 = time.perf_counter()
    tasks = task_set.task_names
    refs = reference_rows(pool, task_set)
    timings["references"] = time.perf_counter() - t0
    ft_val = finetuned_reference(refs, task_set, "val")
    ft_test = finetuned_reference(refs, task_set, "test")
    rows = {name: _row(refs[name]["test"], ft_test, None) for name in refs}
    sweeps = {}
    for method in methods:
        t0 = time.perf_counter()
        grid = (method.fixed_alpha(len(tasks)),) if method.fixed_alpha else method.alpha_grid
        result = sweep_task_vector(pool, task_vectors[method.name], tasks, grid, ft_val,
                                   options.early_stop)
        rows[method.name] = _row(result["test"], ft_test, result["alpha"])
        sweeps[method.name] = result["sweep"]
        timings[f"sweep_{method.name}"] = time.perf_counter() - t0
        log(f"  {method.name}: alpha={result['alpha']:g}  "
            f"normalized {100 * rows[method.name].normalized:.1f}%  "
            f"absolute {100 * rows[method.name].absolute:.1f}%  "
            f"(merge {timings[f'merge_{method.name}']:.0f} s, "
            f"sweep {timings[f'sweep_{method.name}']:.0f} s)")
    return rows, sweeps


def _row(test: dict[str, float], ft_test: dict[str, float], alpha: float | None) -> MethodRow:
    return MethodRow(alpha=alpha, absolute=absolute(test), normalized=normalized(test, ft_test),
                     per_task={t: TaskScore(absolute=a, normalized=a / ft_test[t])
                               for t, a in test.items()})


def summary_table(summary: BenchSummary) -> pa.Table:
    """One row per (method, task) plus each method's mean row (task = "mean")."""
    cols: dict[str, list] = {k: [] for k in ("suite", "num_tasks", "method", "alpha", "task",
                                             "absolute", "normalized")}
    for method, row in summary.rows.items():
        entries = [(t, v.absolute, v.normalized) for t, v in row.per_task.items()]
        entries.append(("mean", row.absolute, row.normalized))
        for task, acc, norm in entries:
            for k, v in zip(cols, (summary.suite, summary.num_tasks, method, row.alpha, task,
                                   acc, norm)):
                cols[k].append(v)
    return pa.table(cols)


def format_table(summary: BenchSummary) -> str:
    """Markdown: one line per method, accuracy per task (absolute / normalised, %)."""
    head = ["method", "alpha", "abs", "norm"] + summary.tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in summary.rows.items():
        alpha = "-" if row.alpha is None else f"{row.alpha:.3g}"
        cells = [method, alpha, f"{100 * row.absolute:.1f}", f"{100 * row.normalized:.1f}"]
        cells += [f"{100 * row.per_task[t].absolute:.1f} / "
                  f"{100 * row.per_task[t].normalized:.0f}" for t in summary.tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: str, summary: BenchSummary) -> None:
    """summary.json, .parquet and .md into `out` (a local directory or an object-store
    prefix), each appearing whole."""
    storage.make_dirs(out)
    text = summary.to_json()
    write_file_atomic(storage.join(out, "summary.json"), lambda fh: fh.write(text.encode()))
    write_file_atomic(storage.join(out, "summary.parquet"),
                      lambda fh: pq.write_table(summary_table(summary), fh))
    table = format_table(summary) + "\n"
    write_file_atomic(storage.join(out, "summary.md"), lambda fh: fh.write(table.encode()))
