"""Scale-out benchmark: where the output goes and who writes it, on an embedded Ray cluster.

    .venv/bin/python benchmarks/scaleout_bench.py --model vit-b-32 --tasks 8 --workers 2

Four modes of one merge (Iso-CTS by default), each in a fresh child process so peak RSS is
the merge's alone: a local --out and an object-store --out (a local S3 server, moto, on
127.0.0.1), each written by the workers or assembled by the driver
from tensors the workers return through Ray's object store. Prints wall seconds of the whole
`run_merge` (checks, probes, merge, read-back, commit) on a cluster started beforehand, driver
and worker peak RSS, bytes through Ray's object store, and the CPU seconds the local S3 server
used (it shares this machine's cores with the merge). Checkpoints are the real CLIP vision
architecture with random weights, shared with merge_bench.py's cache. It asserts nothing: the
goals are read off the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

MODES = {  # key: (what the table calls it, output kind, --assembly)
    "local-workers": ("local dir, workers write", "local", "workers"),
    "s3-workers": ("object store (S3), workers write", "s3", "workers"),
    "local-driver": ("local dir, driver assembles", "local", "driver"),
    "s3-driver": ("object store (S3), driver assembles", "s3", "driver"),
}
MiB = 1 << 20


def child(args: argparse.Namespace) -> None:
    """One merge; prints its measurements as JSON on the last line."""
    from pipeline.engine.config import MergeConfig
    from pipeline.engine.driver import run_merge
    from pipeline.runtime.executors import RayExecutor

    executor = RayExecutor(workers=args.workers, threads=1)  # started before the clock
    config = MergeConfig(base=args.base, finetuned=args.finetuned, method=args.method,
                         alpha=1.0, out=args.out, assembly=args.assembly)
    started = time.perf_counter()
    report = run_merge(config, executor=executor)  # checks, probes, merge, read-back, commit
    wall = time.perf_counter() - started
    print(json.dumps({
        "wall_s": wall,
        "commit_s": wall - report.timings_s["total"],  # the report is written before the commit
        "driver_rss": report.engine.model_extra.get("peak_driver_rss_bytes"),
        "worker_rss": report.engine.peak_worker_rss_bytes,
        "object_store_bytes": report.engine.model_extra.get("object_store_bytes"),
        "assembly": report.engine.model_extra.get("assembly"),
        "output_bytes": sum(f.size for f in report.outputs)}))


def run_mode(args, base, finetuned, out: str, assembly: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", args.method, "--workers",
           str(args.workers), "--base", base, "--out", out, "--assembly", assembly,
           "--finetuned", *finetuned]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                          env={**os.environ, "MERGE_PIPELINE_PROGRESS": "0"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-b-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--method", default="iso_cts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--cache", default=os.path.join("benchmarks", ".cache"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--finetuned", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--assembly", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from merge_bench import ensure_checkpoints
    from s3_server import free_port, point_s3_at, running_s3_server, server_cpu_seconds

    base, finetuned = ensure_checkpoints(args.model, args.tasks, args.cache)
    port = free_port()
    point_s3_at(port)  # inherited by the children and their Ray workers
    rows = []
    with running_s3_server(port, "scaleout-bench") as bucket, \
            tempfile.TemporaryDirectory(dir=args.cache) as scratch:
        for repeat in range(args.repeats):
            for key in args.modes.split(","):
                name, kind, assembly = MODES[key]
                out = (f"{bucket}/run{repeat}/{assembly}" if kind == "s3"
                       else os.path.join(scratch, f"run{repeat}-{assembly}-{kind}"))
                before = server_cpu_seconds(port)
                result = run_mode(args, base, finetuned, out, assembly)
                result["store_cpu_s"] = server_cpu_seconds(port) - before
                rows.append((name, result))
                print(f"  {name}: {result['wall_s']:.1f} s", file=sys.stderr)
    print(f"\n{args.model}, T={args.tasks}, {args.method}, {args.workers} Ray workers x 1 "
          f"thread, float32; output {rows[0][1]['output_bytes'] / MiB:.0f} MiB\n")
    print("| mode | wall s | of which commit s | S3 server CPU s | driver peak RSS MiB | "
          "worker peak RSS MiB | bytes via Ray object store MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall_s']:.1f} | {r['commit_s']:.1f} | {r['store_cpu_s']:.1f} | "
              f"{r['driver_rss'] / MiB:.0f} | {r['worker_rss'] / MiB:.0f} | "
              f"{r['object_store_bytes'] / MiB:.0f} |")


if __name__ == "__main__":
    main()
