"""Merge benchmark: wall time, SVD time, bytes read and peak memory, per method and worker count.

    .venv/bin/python benchmarks/merge_bench.py --models vit-b-32 --methods iso_c,iso_cts \
        --tasks 8 --workers 1,2

Checkpoints have the real CLIP vision architecture (transformers' `CLIPVisionModel` built from
the ViT-B/32 or ViT-L/14 config, random init, nothing downloaded); each task adds a low-rank
update with a decaying spectrum plus noise. They are cached under --cache and reused; a marker
written last means a half-written cache is never trusted. This prints numbers; it asserts
nothing (speed and memory goals are read off the table, not tested).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.io import write_json_atomic, write_safetensors  # noqa: E402
from pipeline.engine.config import MergeConfig  # noqa: E402
from pipeline.engine.driver import run_merge  # noqa: E402
from pipeline.bench.examples import finetune_like  # noqa: E402
from pipeline.runtime.executors import RayExecutor  # noqa: E402

ARCHITECTURES = {
    "vit-b-32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=224, patch_size=32),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=224, patch_size=14),
}
# ViT-L/14's widths, its first 4 blocks: the shapes of the whole model at a sixth of the time
# (shared with reference_bench.py's `vit-l-14-blocks` case and its checkpoints).
ARCHITECTURES["vit-l-14-4blocks"] = dict(ARCHITECTURES["vit-l-14"], num_hidden_layers=4)
ALPHAS = {"average": None, "task_arithmetic": 0.3, "ties": 0.3}
GiB = 1 << 30


def checkpoint_paths(model: str, num_tasks: int, cache: str) -> list[str]:
    root = os.path.join(cache, model)
    return [os.path.join(root, "base")] + [os.path.join(root, f"task{i:02d}")
                                          for i in range(1, num_tasks + 1)]


def ensure_checkpoints(model: str, num_tasks: int, cache: str) -> tuple[str, list[str]]:
    """Build missing checkpoints in a child process, so the driver's peak RSS measured here
    is the merge's alone."""
    paths = checkpoint_paths(model, num_tasks, cache)
    if not all(os.path.exists(os.path.join(p, ".complete")) for p in paths):
        subprocess.run([sys.executable, __file__, "--build", model, "--tasks", str(num_tasks),
                        "--cache", cache], check=True)
    return paths[0], paths[1:]


def build_checkpoints(model: str, num_tasks: int, cache: str) -> None:
    paths = checkpoint_paths(model, num_tasks, cache)
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    net = CLIPVisionModel(CLIPVisionConfig(**ARCHITECTURES[model]))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    config = net.config.to_dict()
    del net
    for i, path in enumerate(paths):
        if os.path.exists(os.path.join(path, ".complete")):
            continue
        t0 = time.perf_counter()
        os.makedirs(path, exist_ok=True)
        weights = base if i == 0 else finetune_like(base, seed=i)
        write_safetensors(os.path.join(path, "model.safetensors"), weights)
        write_json_atomic(os.path.join(path, "config.json"), config)
        open(os.path.join(path, ".complete"), "w").close()
        print(f"  wrote {path} ({time.perf_counter() - t0:.1f} s)", flush=True)


def measure(model, method, base, tuned, workers, executor, out) -> dict:
    alpha = ALPHAS.get(method, 1.0)
    config = MergeConfig(base=base, finetuned=tuned, method=method, alpha=alpha,
                         out=os.path.join(out, "merged"), overwrite=True,
                         engine="local" if executor is None else "ray")
    t0 = time.perf_counter()
    report = run_merge(config, executor=executor)
    wall = time.perf_counter() - t0
    shards = report.engine.shards
    num_tasks = len(tuned)
    largest_shard = max(s.bytes_read / (num_tasks + 1) for s in shards)  # one copy
    return {
        "model": model, "method": method, "T": num_tasks,
        "workers": "plain loop" if executor is None else workers,
        "wall_s": round(wall, 1),
        "svd_s": report.numerics.svd_seconds,
        "read_GB": round(sum(s.bytes_read for s in shards) / 1e9, 2),
        "driver_peak_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        "worker_peak_GiB": round(report.engine.peak_worker_rss_bytes / GiB, 2),
        "goal_(T+2)x_shard_GiB": round((num_tasks + 2) * largest_shard / GiB, 2),
        "fallbacks": len(report.numerics.fallbacks),
    }


def markdown(rows: list[dict]) -> str:
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-b-32,vit-l-14")
    parser.add_argument("--methods", default="average,task_arithmetic,ties,tsv_m,iso_c,iso_cts")
    parser.add_argument("--tasks", default="8")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--plain-loop", default="",
                        help="methods also timed in a plain in-process loop (overhead baseline)")
    parser.add_argument("--cache", default=os.path.join("benchmarks", ".cache"))
    parser.add_argument("--out", default=os.path.join("benchmarks", ".cache", "results"))
    parser.add_argument("--build", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_checkpoints(args.build, int(args.tasks), args.cache)
    os.environ.setdefault("MERGE_PIPELINE_PROGRESS", "0")
    worker_counts = [int(w) for w in args.workers.split(",")]
    executors = {w: RayExecutor(workers=w) for w in worker_counts}
    rows = []
    for model in args.models.split(","):
        for num_tasks in [int(t) for t in args.tasks.split(",")]:
            base, tuned = ensure_checkpoints(model, num_tasks, args.cache)
            for method in args.methods.split(","):
                runs = [(w, executors[w]) for w in worker_counts]
                if method in args.plain_loop.split(","):
                    runs.insert(0, (1, None))
                for workers, executor in runs:
                    row = measure(model, method, base, tuned, workers, executor, args.out)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows)
    print("\n" + table)
    with open(os.path.join(args.out, "merge_bench.md"), "w") as f:
        f.write(table + "\n")
    write_json_atomic(os.path.join(args.out, "merge_bench.json"), rows)


if __name__ == "__main__":
    main()
