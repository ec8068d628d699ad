"""Our merge CLI end to end against the public reference code (fusion-bench 0.2.33), same run.

    .venv/bin/python benchmarks/reference_bench.py --cases vit-b-32 --methods iso_cts --tasks 8
    .venv/bin/python benchmarks/reference_bench.py            # vit-b-32 and vit-l-14-blocks, T 8,20

What is compared, per case (checkpoint shape), method (`tsv_m`, `iso_cts`) and task count T:
- reference: fusion-bench's own functions, `compute_and_sum_svd_mem_reduction` (TSV-M) and
  `iso_cts` (Iso-CTS, common_space_fraction 0.8), called in this process on float32 task vectors
  `{key: ft - base}` that are already in memory (built before the clock starts; the clock covers
  the function call only, its per-key prints sent to /dev/null). Where its float32 SVDs fail
  to converge (Iso-CTS on ViT-B/32 does), it runs again on float64 task vectors, as a user
  would have to, and that time is marked `(float64)`.
- ours: `merge-pipeline merge ... --output task_vector` in a subprocess, timed from outside:
  interpreter start, imports, input scan, Ray start, reads, merge, writes, verification, commit
  and shutdown. Its report's `timings_s` splits that wall time; the second table lists what is
  not `merge` (the fixed costs).
- accuracy: the max relative Frobenius error, over the compared keys, of each merged task vector
  against `tests/spec_reference.py` evaluated in float64 on the float64 deltas of the stored
  checkpoints. Compared keys: 2-D floating keys that both implementations merge with the SVD
  rule (ours: not matching `pipeline.methods.DEFAULT_EXCLUDE`, the same keys are passed to the
  reference as `exclude_keys` so both average them; keys our planner merges transposed, HF's
  projections, are left out since the reference merges them as stored). In a CLIP vision tower
  that is every q/k/v/out/fc1/fc2 weight and `position_embedding.weight` (50 x 768 on ViT-B/32:
  both run the SVD rule on it); `patch_embedding.weight` (4-D), biases, norms and
  `class_embedding` are averaged by both and not compared. `--error-layers` picks the blocks
  (default the first and the last); every non-block matrix key is always compared.

Fairness: both run on the same cores (this process is pinned to `--threads` cores, which the
CLI's subprocess and its Ray workers inherit; the reference runs with
`torch.set_num_threads(threads)`, ours with the CLI's defaults on that many cores unless
`--ours-args` says otherwise). The reference's time excludes reading checkpoints and writing a
result; ours includes both plus start-up, so the ratio (reference s / ours s) understates ours.

Nothing of fusion-bench is committed: the wheel is fetched at run time with `pip download` into
`<cache>/fusion-bench` (reused when present), and only `TSVM_utils.py` and `iso_utils.py` are
extracted from it, beside stub modules of our own for the two names they import
(`timeit_context`, `StateDictType`). The wheel's package `__init__`s are not used.

Checkpoints are merge_bench's (transformers' `CLIPVisionModel`, random weights, `finetune_like`
deltas), cached under --cache and built once per case and T. Writes `reference_bench.md` and
`.json` to --out. Exit codes: 0 every run succeeded, 1 a run or the reference download failed
(the tables say which), 2 bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import glob
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import merge_bench  # noqa: E402
import spec_reference  # noqa: E402

from pipeline.io import open_checkpoint, write_json_atomic  # noqa: E402
from pipeline.io.layout import block_of, transposed_vs_open_clip  # noqa: E402
from pipeline.io.reader import TensorSpec  # noqa: E402
from pipeline.io.storage import write_bytes  # noqa: E402
from pipeline.methods import DEFAULT_EXCLUDE, get_method  # noqa: E402
from pipeline.runtime.ray_cluster import usable_cpus  # noqa: E402

FUSION_BENCH = "fusion-bench==0.2.33"
WHEEL_GLOB = "fusion_bench-0.2.33-*.whl"
REFERENCE_FILES = ("fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
                   "fusion_bench/method/isotropic_merging/iso_utils.py")
# Our stand-ins for the package modules the two files import (the wheel's import the world).
STUBS = {
    "fusion_bench/__init__.py": "",
    "fusion_bench/utils/__init__.py": (
        '"""Stub: the no-op timer the reference code wraps its loops in."""\n'
        "import contextlib\n\n\n"
        "@contextlib.contextmanager\n"
        "def timeit_context(*args, **kwargs):\n"
        "    yield\n"),
    "fusion_bench/utils/type.py": "StateDictType = dict\n",
    "fusion_bench/method/__init__.py": "",
    "fusion_bench/method/task_singular_vector/__init__.py": "",
    "fusion_bench/method/task_singular_vector/utils/__init__.py": "",
    "fusion_bench/method/isotropic_merging/__init__.py": "",
}
COMMON_SPACE_FRACTION = 0.8
# method -> (CLI --param flags, float64 spec of one key's stacked deltas (T, m, n))
OUR_PARAMS = {"tsv_m": [], "iso_cts": ["--param", f"common_space_fraction={COMMON_SPACE_FRACTION}"]}
SPEC: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tsv_m": lambda d: spec_reference.tsv_m(d, dtype=torch.float64),
    "iso_cts": lambda d: spec_reference.iso_cts(d, COMMON_SPACE_FRACTION, torch.float64),
}


@dataclass(frozen=True)
class Case:
    """A checkpoint shape: its name in the tables and in merge_bench's cache and registry."""
    name: str
    cache_name: str
    architecture: dict[str, int]


def cases(l14_layers: int) -> dict[str, Case]:
    """The benchmark's shapes. `tiny` (width 64, 2 layers) is for developing the script."""
    l14 = dict(merge_bench.ARCHITECTURES["vit-l-14"], num_hidden_layers=l14_layers)
    tiny = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8)
    return {"vit-b-32": Case("vit-b-32", "vit-b-32", merge_bench.ARCHITECTURES["vit-b-32"]),
            "vit-l-14-blocks": Case("vit-l-14-blocks", f"vit-l-14-{l14_layers}blocks", l14),
            "tiny": Case("tiny", "refbench-tiny", tiny)}


@dataclass
class RefRun:
    seconds: float | None
    outputs: dict[str, torch.Tensor]  # the compared keys only
    error: str | None = None
    dtype: str = "float32"


@dataclass
class OursRun:
    wall_s: float | None
    timings_s: dict[str, float]
    outputs: dict[str, torch.Tensor]  # the compared keys only
    error: str | None = None


@dataclass
class Row:
    case: str
    method: str
    T: int
    reference_s: float | None
    ours_s: float | None
    ref_max_rel_err: float | None
    ours_max_rel_err: float | None
    compared_keys: int
    reference_dtype: str = "float32"
    ours_timings_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """How many times faster ours is end to end than the reference's in-memory call."""
        return self.reference_s / self.ours_s if self.reference_s and self.ours_s else None

    def cells(self) -> dict[str, str]:
        return {"case": self.case, "method": self.method, "T": str(self.T),
                "reference s": (_num(self.reference_s, "{:.2f}", "failed")
                                + (" (float64)" if self.reference_dtype == "float64" else "")),
                "ours s": _num(self.ours_s, "{:.2f}", "failed"),
                "ratio": _num(self.ratio, "{:.2f}x"),
                "ref max rel err": _num(self.ref_max_rel_err, "{:.1e}"),
                "ours max rel err": _num(self.ours_max_rel_err, "{:.1e}")}

    def fixed_cells(self) -> dict[str, str]:
        """Ours' wall time split: `merge`, the fixed costs around it, and their parts (the
        report's spans; `outside report` is interpreter start, imports and shutdown)."""
        t = self.ours_timings_s
        cells = {"case": self.case, "method": self.method, "T": str(self.T),
                 "wall s": _num(self.ours_s, "{:.2f}")}
        if not t or self.ours_s is None:
            return cells
        spans = {k: v for k, v in t.items() if k not in ("total", "merge")}
        cells["merge s"] = f"{t.get('merge', 0.0):.2f}"
        cells["fixed s"] = f"{self.ours_s - t.get('merge', 0.0):.2f}"
        cells.update({f"{k} s": f"{v:.2f}" for k, v in spans.items()})
        cells["other in report s"] = f"{t['total'] - t.get('merge', 0.0) - sum(spans.values()):.2f}"
        cells["outside report s"] = f"{self.ours_s - t['total']:.2f}"
        return cells


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else fmt.format(value)


# -- the reference code -----------------------------------------------------------------------

def fetch_reference(cache: str) -> str:
    """Download the wheel once, extract the two files and write the stubs; returns the
    directory to put on sys.path."""
    wheel_dir = os.path.join(cache, "fusion-bench")
    if not glob.glob(os.path.join(wheel_dir, WHEEL_GLOB)):
        command = [sys.executable, "-m", "pip", "download", FUSION_BENCH, "--no-deps",
                   "--quiet", "-d", wheel_dir]
        if subprocess.run(command).returncode != 0:
            sys.exit(f"reference_bench: `{shlex.join(command)}` failed; the reference code "
                     f"is fetched at run time (network needed once)")
    wheel = sorted(glob.glob(os.path.join(wheel_dir, WHEEL_GLOB)))[-1]
    src = os.path.join(wheel_dir, "src")
    with zipfile.ZipFile(wheel) as archive:
        files = {name: archive.read(name) for name in REFERENCE_FILES}
    files.update({name: text.encode() for name, text in STUBS.items()})
    for name, data in files.items():
        path = os.path.join(src, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_bytes(path, data)
    return src


def reference_functions(src: str) -> dict[str, Callable[[list[dict], list[str]], dict]]:
    """method -> f(task_vectors, exclude_keys) calling fusion-bench's function on the CPU."""
    sys.path.insert(0, src)
    tsvm = importlib.import_module("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
    iso = importlib.import_module("fusion_bench.method.isotropic_merging.iso_utils")
    return {
        "tsv_m": lambda tvs, excl: tsvm.compute_and_sum_svd_mem_reduction(
            tvs, exclude_keys=excl, accelerator="cpu"),
        "iso_cts": lambda tvs, excl: iso.iso_cts(
            tvs, common_space_fraction=COMMON_SPACE_FRACTION, accelerator="cpu",
            exclude_keys=excl),
    }


def load_task_vectors(base: str, tuned: list[str], keys: list[str]) -> list[dict]:
    """float32 `{key: ft - base}` per task, in memory before any clock starts."""
    with open_checkpoint(base) as b:
        theta0 = {k: b.read(k).float() for k in keys}
    vectors = []
    for path in tuned:
        with open_checkpoint(path) as ft:
            vectors.append({k: ft.read(k).float() - theta0[k] for k in keys})
    return vectors


def as_float64(vectors: list[dict]) -> list[dict]:
    return [{k: v.double() for k, v in tv.items()} for tv in vectors]


def run_reference(fn: Callable[[list[dict], list[str]], dict], vectors: list[dict],
                  exclude: list[str], compared: list[str]) -> RefRun:
    """Time one call; a failure (float32 SVDs can fail to converge) is a row, not a crash."""
    t0 = time.perf_counter()
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), torch.no_grad():
            merged = fn(vectors, exclude)
            seconds = time.perf_counter() - t0
    except (RuntimeError, ValueError) as exc:
        return RefRun(None, {}, f"reference failed after {time.perf_counter() - t0:.1f} s: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return RefRun(seconds, {k: merged[k] for k in compared})


# -- ours -------------------------------------------------------------------------------------

def run_ours(method: str, base: str, tuned: list[str], compared: list[str], scratch: str,
             extra_args: list[str]) -> OursRun:
    """The real CLI in a fresh process, timed from outside; reads back the compared keys."""
    cli = os.path.join(os.path.dirname(sys.executable), "merge-pipeline")
    with tempfile.TemporaryDirectory(dir=scratch, prefix="ours-") as tmp:
        out = os.path.join(tmp, "tau")
        command = [cli, "merge", "--base", base, "--finetuned", *tuned, "--method", method,
                   "--alpha", "1", "--output", "task_vector", "--out", out, "--overwrite",
                   *OUR_PARAMS[method], *extra_args]
        env = dict(os.environ, MERGE_PIPELINE_PROGRESS="0")
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return OursRun(None, {}, {}, f"ours: exit {done.returncode}: {last}")
        with open(os.path.join(out, "merge_report.json")) as f:
            timings = json.load(f)["timings_s"]
        with open_checkpoint(out) as merged:
            outputs = {k: merged.read(k) for k in compared}
    return OursRun(wall, timings, outputs)


# -- accuracy ---------------------------------------------------------------------------------

def compared_keys(specs: Mapping[str, TensorSpec], method: str, layers: str) -> list[str]:
    """2-D floating keys both implementations merge with the SVD rule, in the chosen blocks
    (`first`, `last`, block indices, or `all`) plus every non-block one."""
    rule = get_method(method)
    matrix = [k for k, s in specs.items() if s.is_float
              and rule.uses_matrix_rule(k, s.shape, DEFAULT_EXCLUDE)
              and not transposed_vs_open_clip(k, s.shape)]
    if layers == "all":
        return matrix
    blocks = sorted({b[1] for k in matrix if (b := block_of(k)) is not None})
    chosen = set()
    for token in (t.strip() for t in layers.split(",")):
        if blocks and token in ("first", "last"):
            chosen.add(blocks[0] if token == "first" else blocks[-1])
        elif token.isdigit():
            chosen.add(int(token))
    return [k for k in matrix if (b := block_of(k)) is None or b[1] in chosen]


def max_relative_errors(base: str, tuned: list[str], keys: list[str], method: str,
                        results: Mapping[str, dict[str, torch.Tensor]]
                        ) -> dict[str, float | None]:
    """Per result set ({label: {key: merged}}, all of `method`): the max over keys of
    ||X - spec|| / ||spec||, the spec in float64 on the float64 deltas of the checkpoints
    (evaluated once per key; a failed run has no outputs and gets None)."""
    worst: dict[str, float | None] = {label: None for label in results}
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(open_checkpoint(base))
        fts = [stack.enter_context(open_checkpoint(p)) for p in tuned]
        for key in keys:
            if not any(key in outputs for outputs in results.values()):
                continue
            theta0 = b.read(key).double()
            spec = SPEC[method](torch.stack([ft.read(key).double() - theta0 for ft in fts]))
            for label, outputs in results.items():
                if key in outputs:
                    err = float((outputs[key].double() - spec).norm() / spec.norm())
                    previous = worst[label]
                    worst[label] = err if previous is None else max(previous, err)
    return worst


# -- driver -----------------------------------------------------------------------------------

def ensure_checkpoints(case: Case, num_tasks: int, cache: str) -> tuple[str, list[str]]:
    """merge_bench's cache and builder, with this case's architecture registered in it."""
    merge_bench.ARCHITECTURES.setdefault(case.cache_name, case.architecture)
    paths = merge_bench.checkpoint_paths(case.cache_name, num_tasks, cache)
    if not all(os.path.exists(os.path.join(p, ".complete")) for p in paths):
        merge_bench.build_checkpoints(case.cache_name, num_tasks, cache)
        gc.collect()
    return paths[0], paths[1:]


def bench_case(case: Case, num_tasks: int, methods: list[str], args: argparse.Namespace,
               reference: Mapping[str, Callable[[list[dict], list[str]], dict]],
               ours_args: list[str]) -> list[Row]:
    """One case and T: the reference for every method (task vectors loaded once), then ours,
    then the errors of both against the float64 spec."""
    base, tuned = ensure_checkpoints(case, num_tasks, args.cache)
    with open_checkpoint(base) as b:
        specs = b.specs()
    keys = [k for k, s in specs.items() if s.is_float]
    exclude = [k for k in keys if any(p in k for p in DEFAULT_EXCLUDE)]
    compared = {m: compared_keys(specs, m, args.error_layers) for m in methods}
    vectors = load_task_vectors(base, tuned, keys)
    refs = {}
    for method in methods:
        refs[method] = run_reference(reference[method], vectors, exclude, compared[method])
        if refs[method].seconds is None:  # as users would: run it again in float64
            failed = refs[method].error
            print(f"  {case.name} T={num_tasks} {method}: {failed}; again in float64", flush=True)
            refs[method] = run_reference(reference[method], as_float64(vectors), exclude,
                                         compared[method])
            refs[method].dtype = "float64"
        print(f"  {case.name} T={num_tasks} {method}: "
              f"{refs[method].error or f'reference {refs[method].seconds:.2f} s'}", flush=True)
    del vectors
    gc.collect()
    ours = {}
    for method in methods:
        ours[method] = run_ours(method, base, tuned, compared[method], args.cache, ours_args)
        print(f"  {case.name} T={num_tasks} {method}: "
              f"{ours[method].error or f'ours {ours[method].wall_s:.2f} s'}", flush=True)
    rows = []
    for method in methods:
        results = {"ref": refs[method].outputs, "ours": ours[method].outputs}
        worst = max_relative_errors(base, tuned, compared[method], method, results)
        rows.append(Row(case.name, method, num_tasks, refs[method].seconds, ours[method].wall_s,
                        worst["ref"], worst["ours"], len(compared[method]),
                        refs[method].dtype, ours[method].timings_s,
                        [e for e in (refs[method].error, ours[method].error) if e]))
    return rows


def pin_threads(threads: int) -> None:
    """Run this process, the CLI it starts and that CLI's Ray workers on the same `threads`
    cores; the reference uses as many torch threads."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    torch.set_num_threads(threads)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cases", default="vit-b-32,vit-l-14-blocks",
                        help="vit-b-32 (whole vision tower), vit-l-14-blocks (ViT-L/14 widths, "
                             "--l14-layers blocks)")
    parser.add_argument("--methods", default="tsv_m,iso_cts")
    parser.add_argument("--tasks", default="8,20", help="task counts T, comma-separated")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="cores for both (default: all this process may use)")
    parser.add_argument("--l14-layers", type=int, default=4)
    parser.add_argument("--error-layers", default="first,last",
                        help="blocks whose matrices are compared: first, last, indices or all "
                             "(non-block matrix keys always are)")
    parser.add_argument("--ours-args", default="",
                        help="extra merge-pipeline flags, given with '=': "
                             "--ours-args='--workers 1 --threads 2'")
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", ".cache"))
    parser.add_argument("--out", default=None, help="where the tables go (default: --cache)")
    args = parser.parse_args()
    known = cases(args.l14_layers)
    for name in args.cases.split(","):
        if name not in known:
            parser.error(f"--cases: unknown case {name!r}; choose from vit-b-32, vit-l-14-blocks")
    for method in args.methods.split(","):
        if method not in SPEC:
            parser.error(f"--methods: unknown method {method!r}; choose from tsv_m, iso_cts")
    if not all(t.strip().isdigit() and int(t) >= 2 for t in args.tasks.split(",")):
        parser.error(f"--tasks: expected task counts >= 2, got {args.tasks!r}")
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        parser.error(f"--threads: between 1 and {len(os.sched_getaffinity(0))}")
    tokens = [t.strip() for t in args.error_layers.split(",")]
    if not all(t in ("first", "last", "all") or t.isdigit() for t in tokens):
        parser.error(f"--error-layers: expected first, last, all or block indices, "
                     f"got {args.error_layers!r}")
    if args.l14_layers < 1:
        parser.error("--l14-layers: at least 1")
    return args


def markdown_rows(rows: list[dict[str, str]]) -> str:
    """One table over the union of the rows' columns (fixed-cost spans differ by run)."""
    heads = list(dict.fromkeys(h for r in rows for h in r))
    return merge_bench.markdown([{h: r.get(h, "-") for h in heads} for r in rows])


def main() -> None:
    args = parse_args()
    pin_threads(args.threads)
    out = args.out or args.cache
    os.makedirs(out, exist_ok=True)
    known = cases(args.l14_layers)
    methods = args.methods.split(",")
    ours_args = shlex.split(args.ours_args)
    header = (f"cores: {os.cpu_count()} on the host, {args.threads} used by both; "
              f"torch {torch.__version__}; reference {FUSION_BENCH}; "
              f"ours: merge-pipeline {shlex.join(ours_args) or '(defaults)'}")
    print(header, flush=True)
    reference = reference_functions(fetch_reference(args.cache))
    rows: list[Row] = []
    for name in args.cases.split(","):
        for num_tasks in [int(t) for t in args.tasks.split(",")]:
            for row in bench_case(known[name], num_tasks, methods, args, reference, ours_args):
                if not rows:
                    print("\n".join(merge_bench.markdown([row.cells()]).splitlines()[:2]))
                print(merge_bench.markdown([row.cells()]).splitlines()[2], flush=True)
                rows.append(row)
    failures = [e for r in rows for e in r.errors]
    text = "\n\n".join([header, markdown_rows([r.cells() for r in rows]),
                        "Ours' fixed costs (wall time that is not `merge`), seconds:",
                        markdown_rows([r.fixed_cells() for r in rows])]
                       + (["Failures:\n" + "\n".join(f"- {e}" for e in failures)]
                          if failures else [])) + "\n"
    print("\n" + text, flush=True)
    write_bytes(os.path.join(out, "reference_bench.md"), text.encode())
    write_json_atomic(os.path.join(out, "reference_bench.json"), {
        "cores_host": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "reference": FUSION_BENCH, "ours_args": ours_args, "error_layers": args.error_layers,
        "rows": [dict(dataclasses.asdict(r), ratio=r.ratio) for r in rows]})
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
