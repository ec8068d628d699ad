"""Fixed costs of a small merge: what a tiny TSV-M merge pays besides the merge itself.

    .venv/bin/python benchmarks/fixed_costs_bench.py --repeats 3

Runs `merge-pipeline merge` (as `python -m pipeline`) on a tiny example (4 tasks, the `demo`
shape, ~11 MB per checkpoint) in a fresh subprocess, `--repeats` times per engine (the
embedded Ray cluster, a cluster started once by `ray start` and joined with `--address`, as
on a team's cluster, and in-process for comparison), and prints the median of each span:

- from the report's `timings_s` and `engine`: the cluster's start (`ray.init`, the reaper),
  the rest of the executor's start, the first tasks (worker processes import their module,
  torch with it, while the nodes are probed; `worker_import_s` is the slowest warm-up
  import), planning, the merge and any other span the driver records;
- from the CLI's phase stamps (MERGE_PIPELINE_PHASES=1: `merge-pipeline phase NAME T` on
  stderr, T on the system-wide monotonic clock this process reads too): the interpreter's
  start and imports before `main`, the command outside `run_merge` (options, summary), the
  cluster's shutdown, and the interpreter's exit after it.

The fixed costs are everything but the work that grows with the model: the wall time less
the merge, the data spans (input scans, digests, statistics) and the commit. Their sum is
compared with the 3 s goal. It asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GOAL_S = 3.0
# Spans of the report's timings_s that are fixed costs; any other (but `total`) is data work.
FIXED_SPANS = ("validate_and_plan", "executor_start", "probe_nodes")
PHASES = ("main", "command", "shutdown")


@dataclass
class Run:
    """One merge's spans (seconds), in table order; and which are fixed costs."""

    spans: dict[str, float] = field(default_factory=dict)
    fixed: set[str] = field(default_factory=set)

    def add(self, name: str, seconds: float | None, fixed: bool) -> None:
        if seconds is None:
            return
        self.spans[name] = seconds
        if fixed:
            self.fixed.add(name)


def merge_once(example: tuple[str, list[str]], out: str, engine: str) -> Run:
    """One CLI run in a subprocess, timed from outside; its spans. `ray-joined` joins the
    running cluster (`joined_cluster`) instead of starting an embedded one."""
    base, tuned = example
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, MERGE_PIPELINE_PHASES="1", MERGE_PIPELINE_PROGRESS="0")
    where = ["--engine", engine]
    if engine == "ray-joined":  # `ray start` clusters use token auth; the token is in ~/.ray
        where = ["--engine", "ray", "--address", JOINED_ADDRESS]
        env["RAY_AUTH_MODE"] = "token"
    argv = [sys.executable, "-m", "pipeline", "merge", "--base", base, "--finetuned", *tuned,
            "--method", "tsv_m", "--alpha", "1", *where, "--out", out]
    spawned = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    ended = time.monotonic()
    if proc.returncode != 0:
        sys.exit(f"merge --engine {engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stamps = {}
    for line in proc.stderr.splitlines():
        parts = line.split()
        if parts[:2] == ["merge-pipeline", "phase"] and len(parts) == 4:
            stamps[parts[2]] = float(parts[3])
    with open(os.path.join(out, "merge_report.json")) as f:
        report = json.load(f)
    return spans_of(report, stamps, spawned, ended)


JOINED_ADDRESS = "127.0.0.1:6389"


@contextlib.contextmanager
def joined_cluster(cpus: int) -> Iterator[None]:
    """A local cluster started with `ray start` (untimed), as a team's cluster is there before
    any job: what each merge then pays is what it pays on a real cluster."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "start", "--head", f"--port={JOINED_ADDRESS.rsplit(':', 1)[1]}",
                    f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True)


def spans_of(report: dict, stamps: dict[str, float], spawned: float, ended: float) -> Run:
    """The table's rows for one run (phases the CLI did not stamp are left out)."""
    timings, engine = dict(report["timings_s"]), report["engine"]
    total = timings.pop("total")
    outside_spans = total - sum(timings.values())  # index, metadata, report, the commit
    run = Run()
    have = all(p in stamps for p in PHASES)
    run.add("CLI start (interpreter, imports)", stamps["main"] - spawned if have else None, True)
    run.add("planning (validate_and_plan)", timings.pop("validate_and_plan", None), True)
    start = timings.pop("executor_start", None)
    startup = engine.get("startup_s", 0.0)
    if engine["kind"] == "ray":
        run.add("cluster start (ray.init, reaper)", startup, True)
        run.add("executor start, rest", None if start is None else start - startup, True)
    else:
        run.add("executor start", start, True)
    probe = timings.pop("probe_nodes", None)
    run.add("first tasks: worker start + node probe", probe, True)
    run.add("  of which worker import (warm-up)", engine.get("worker_import_s"), False)
    for name, seconds in timings.items():  # merge, and whatever else the driver timed
        run.add(name, seconds, False)
    run.add("commit/write (rest of run_merge)", outside_spans, False)
    if have:
        run.add("CLI outside the total (options, commit, summary)",
                stamps["command"] - stamps["main"] - total, True)
        run.add("shutdown (cluster, reaper)", stamps["shutdown"] - stamps["command"], True)
        run.add("interpreter exit", ended - stamps["shutdown"], True)
    run.add("total wall", ended - spawned, False)
    run.add("fixed costs (sum)", sum(v for k, v in run.spans.items() if k in run.fixed), False)
    return run


def table(results: dict[str, list[Run]]) -> str:
    """Markdown: one row per span, the median per engine, and the runs' values."""
    engines = list(results)
    rows: list[str] = []
    for run in (r for runs in results.values() for r in runs):
        rows += [k for k in run.spans if k not in rows]
    rows = [r for r in rows if r not in ("total wall", "fixed costs (sum)")] + \
        ["total wall", "fixed costs (sum)"]
    head = "| span (s) | " + " | ".join(f"{e} median | {e} runs" for e in engines) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(engines))]
    for row in rows:
        cells = []
        for engine in engines:
            values = [r.spans[row] for r in results[engine] if row in r.spans]
            mark = "" if not values or all(row not in r.fixed for r in results[engine]) \
                else " *"
            cells += [f"{statistics.median(values):.2f}{mark}" if values else "-",
                      " ".join(f"{v:.2f}" for v in values)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="ray,ray-joined,local",
                        help="comma-separated: ray (embedded cluster), ray-joined (a cluster "
                             "started once by `ray start`), local (in-process)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "fixed-costs-bench"))
    args = parser.parse_args()
    from pipeline.bench.examples import write_example
    example = write_example(os.path.join(args.workdir, "ex"), "demo", 4)
    results: dict[str, list[Run]] = {}
    for engine in args.engines.split(","):
        results[engine] = []
        joined = joined_cluster(len(os.sched_getaffinity(0))) if engine == "ray-joined" else \
            contextlib.nullcontext()
        with joined:
            for i in range(args.repeats):
                run = merge_once(example, os.path.join(args.workdir, f"out-{engine}"), engine)
                print(f"{engine} run {i + 1}: wall {run.spans['total wall']:.2f} s, fixed "
                      f"{run.spans['fixed costs (sum)']:.2f} s", file=sys.stderr)
                results[engine].append(run)
    print(table(results))
    print("\n* a fixed cost")
    for engine, runs in results.items():
        fixed = statistics.median(r.spans["fixed costs (sum)"] for r in runs)
        verdict = "meets" if fixed < GOAL_S else "misses"
        print(f"{engine}: fixed costs {fixed:.2f} s (median) {verdict} the {GOAL_S:g} s goal")


if __name__ == "__main__":
    main()
