"""Evaluation throughput: a plain PyTorch loop against the evaluation pool, on real-sized data.

    .venv/bin/python benchmarks/eval_throughput_bench.py --images 600 --memory-images 300,1200

The benchmark writes what a user would have: a ViT-B/32 (the real config, random weights) as
a Hugging Face directory, a parquet dataset in the Hugging Face layout with 224 px JPEGs, a
head file and a task manifest. Then, each in a fresh child process (so peak RSS is that mode's
alone), it classifies every image of the test split:

- plain loop: one process reads the parquet file, decodes and preprocesses each image, and
  runs the model batch by batch, one step after the other (same model, same transform, same
  batch, same thread count as one actor);
- the pool through the manifest with 1 and with 2 Ray actors (1 thread each): the driver
  sends (weights, task, split, row range); actors read their row groups, decode in a
  background thread and run the model.

Images/s counts the evaluation call only (actors are started and have loaded theta_0 before
the clock starts). The driver's peak RSS is measured at two dataset sizes to show it does not
grow with the data. Every mode must count the same number of correct predictions; the table
says so. The goals are read off the table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CLASSES = 10
MiB = 1 << 20


def make_workspace(root: str, images: int, seed: int = 0) -> str:
    """Model, dataset, head and manifest under `root`; returns the manifest's path."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from pipeline.bench.suites.build import save_model
    from pipeline.bench.suites.export import hf_image_table
    from pipeline.io.safetensors_io import write_safetensors
    from pipeline.models.vit import ClipVisionTower, VisionConfig, init_clip_weights

    base = os.path.join(root, "vit-b-32")
    if not os.path.isdir(base):
        model = ClipVisionTower(VisionConfig())  # ViT-B/32's real configuration
        init_clip_weights(model, seed)
        save_model(model, base)
    rng = np.random.default_rng(seed)
    encoded = []
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    for _ in range(images):
        # Smooth colour fields with texture: JPEGs of a realistic size (~10-20 KB).
        a, b, c = rng.uniform(0, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(2, 12, 3)
        pixels = np.stack([a[i] + 0.4 * np.sin(c[i] * (xx + b[i] * yy)) for i in range(3)], -1)
        pixels += rng.normal(0, 0.05, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    labels = rng.integers(0, CLASSES, images)
    data = os.path.join(root, f"data-{images}", "data")
    os.makedirs(data, exist_ok=True)
    table = hf_image_table(encoded, labels, [f"class {i}" for i in range(CLASSES)], "jpg")
    pq.write_table(table, os.path.join(data, "test-00000-of-00001.parquet"),
                   row_group_size=100)
    head = torch.nn.functional.normalize(torch.randn(CLASSES, 512,
                                                     generator=torch.Generator().manual_seed(1)),
                                         dim=-1)
    write_safetensors(os.path.join(root, "head.safetensors"), {"weight": head * 100})
    manifest = os.path.join(root, f"tasks-{images}.yaml")
    with open(manifest, "w") as fh:
        fh.write(f"base: vit-b-32\npreprocess: clip\ntasks:\n  - name: bench\n"
                 f"    data: data-{images}\n    splits: {{test: test, validation: test}}\n"
                 f"    head: head.safetensors\n    finetuned_accuracy: "
                 f"{{validation: 1.0, test: 1.0}}\n")
    return manifest


def plain_loop(manifest: str, threads: int) -> dict:
    """The baseline: read, decode, preprocess, forward, one after the other."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipeline.evaluation.heads import load_head_file
    from pipeline.evaluation.preprocess import Preprocess
    from pipeline.models.loading import load_vision
    from pipeline.models.vit import ClipVisionTower

    torch.set_num_threads(threads)
    root = os.path.dirname(manifest)
    images = int(os.path.basename(manifest).split("-")[1].split(".")[0])
    loaded = load_vision(os.path.join(root, "vit-b-32"))
    model = ClipVisionTower(loaded.config).eval()
    model.load_state_dict(loaded.tensors, strict=False)
    head = load_head_file(os.path.join(root, "head.safetensors"))
    preprocess = Preprocess.clip(224)
    started = time.perf_counter()
    table = pq.read_table(os.path.join(root, f"data-{images}", "data",
                                       "test-00000-of-00001.parquet"))
    column, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), 100):
            pixels = torch.from_numpy(np.stack(
                [preprocess.decode(row["bytes"], "bench") for row in column[i:i + 100]]))
            embeds = model.embed(preprocess.normalize_batch(pixels))
            pred = head.logits(embeds).argmax(-1)
            correct += int((pred == torch.tensor(labels[i:i + 100])).sum())
    return {"seconds": time.perf_counter() - started, "images": len(labels), "correct": correct}


def pool_run(manifest: str, actors: int) -> dict:
    from pipeline.bench.runner import open_task_set
    from pipeline.models.weights import Weights

    task_set = open_task_set(tasks_file=manifest, log=lambda *_: None)
    pool = task_set.pool("ray", actors, "cpu", None)
    try:
        pool.actor_pids()  # actors up, theta_0 loaded: start-up is not throughput
        rows = task_set.tasks[0].splits["test"].num_rows
        started = time.perf_counter()
        [(correct, total)] = pool.counts([(Weights.base(), "bench", "test")], "bench")
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    assert total == rows
    return {"seconds": seconds, "images": total, "correct": correct}


def gpu_rows(manifest: str, threads: int) -> list[tuple[str, dict]]:
    """On a GPU host: the in-process pool (`--engine local`, no Ray needed) on cuda in fp32 and
    under bf16 autocast, and on CPU as the reference for the counts."""
    import torch

    from pipeline.bench.runner import open_task_set
    from pipeline.evaluation.pool import EvaluationPool
    from pipeline.models.weights import Weights

    task_set = open_task_set(tasks_file=manifest, log=lambda *_: None)
    rows = []
    for name, device, precision in (("pool in-process, cuda fp32", "cuda", "fp32"),
                                    ("pool in-process, cuda bf16 autocast", "cuda", "bf16"),
                                    (f"pool in-process, cpu fp32 x {threads} threads", "cpu",
                                     "fp32")):
        pool = EvaluationPool(task_set.base, task_set.tasks, "local", device=device,
                              threads=threads if device == "cpu" else 1,
                              preprocess=task_set.manifest.manifest.preprocess,
                              precision=precision)
        request = [(Weights.base(), "bench", "test")]
        if device == "cuda":  # kernels chosen and loaded before the clock
            pool.counts(request, "warm-up")
            torch.cuda.synchronize()
        started = time.perf_counter()
        [(correct, total)] = pool.counts(request, name)
        rows.append((name, {"seconds": time.perf_counter() - started, "images": total,
                            "correct": correct, "driver_peak_rss": 0}))
    return rows


def child(args: argparse.Namespace) -> None:
    result = (plain_loop(args.manifest, args.threads) if args.mode == "plain" else
              pool_run(args.manifest, args.actors))
    result["driver_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def run_child(manifest: str, mode: str, actors: int = 1, threads: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--manifest", manifest,
           "--actors", str(actors), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--memory-images", default="300,1200",
                        help="dataset sizes for the driver-memory rows (2 actors)")
    parser.add_argument("--workdir", help="keep the generated files here (default: a temp dir)")
    parser.add_argument("--gpu", action="store_true",
                        help="on a GPU host: in-process pool on cuda (fp32, bf16) and CPU "
                             "instead of the CPU modes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    root = args.workdir or tempfile.mkdtemp(prefix="eval-bench-")
    os.makedirs(root, exist_ok=True)
    manifest = make_workspace(root, args.images)
    if args.gpu:
        rows = gpu_rows(manifest, os.cpu_count() or 1)
        print(f"\nViT-B/32 (random weights), {args.images} JPEGs 224 px, batch 100\n")
        print("| mode | images/s | correct |\n|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['images'] / r['seconds']:.1f} | {r['correct']} |")
        return
    rows = [("plain loop, 1 thread", run_child(manifest, "plain", threads=1)),
            ("plain loop, 2 threads", run_child(manifest, "plain", threads=2)),
            ("pool, 1 actor x 1 thread", run_child(manifest, "pool", actors=1)),
            ("pool, 2 actors x 1 thread", run_child(manifest, "pool", actors=2))]
    base_rate = rows[0][1]["images"] / rows[0][1]["seconds"]
    one_actor = rows[2][1]["images"] / rows[2][1]["seconds"]
    print(f"\nViT-B/32 (random weights), {args.images} JPEGs 224 px, batch 100, "
          f"{os.cpu_count()} cores\n")
    print("| mode | images/s | vs plain 1 thread | vs pool 1 actor | correct | "
          "driver peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        rate = r["images"] / r["seconds"]
        print(f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {rate / one_actor:.2f}x | "
              f"{r['correct']} | {r['driver_peak_rss'] / MiB:.0f} |")
    print("\n| dataset images (2 actors) | images/s | driver peak RSS MiB |")
    print("|---|---|---|")
    for n in (int(x) for x in args.memory_images.split(",") if x):
        r = run_child(make_workspace(root, n), "pool", actors=2)
        print(f"| {n} | {r['images'] / r['seconds']:.1f} | {r['driver_peak_rss'] / MiB:.0f} |")


if __name__ == "__main__":
    main()
