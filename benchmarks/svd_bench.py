"""SVD-method benchmark: our fast paths against the straightforward spec, with errors and the I/O floor.

    .venv/bin/python benchmarks/svd_bench.py --models vit-b-32,vit-l-14 --tasks 8,20 \
        --methods tsv_m,iso_cts,iso_c,tsv_c

For every model shape, task count and SVD method it times, on this machine and with all its
cores:
- reference: `tests/spec_reference.py` in float32, the spec read literally, one
  `torch.linalg.svd` after another per key (as the official code does);
- ours: the registered method (`pipeline.methods`), the code the engine runs per key;
- the error of both against the same spec evaluated in float64 (max relative Frobenius over
  the keys measured).

Every matrix key of a CLIP ViT has one of three shapes (d x d for q/k/v/out, 4d x d for fc1,
d x 4d for fc2), and both implementations work key by key, so each shape is measured on
`--keys` freshly drawn keys and the model time is the per-key mean times the number of such
keys. The floor is the time to read every input once (T + 1 checkpoints of the model's size)
and write the merged one, measured with our reader and writer on a file of the model's real
tensor shapes. Task matrices are realistic: full rank, power-law spectra, a part shared by all
tasks. This prints a table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import spec_reference  # noqa: E402
from merge_bench import markdown  # noqa: E402
from pipeline.io import open_checkpoint, write_safetensors  # noqa: E402
from pipeline.methods import get_method, numerics_log  # noqa: E402

# (width, layers): every layer has 4 d x d, one 4d x d and one d x 4d matrix.
MODELS = {"vit-b-32": (768, 12), "vit-l-14": (1024, 24)}
REFERENCES = {
    "tsv_m": spec_reference.tsv_m,
    "tsv_c": spec_reference.tsv_c,
    "iso_c": spec_reference.iso_c,
    "iso_cts": lambda d, dtype: spec_reference.iso_cts(d, 0.8, dtype),
}


def key_shapes(width: int) -> list[tuple[tuple[int, int], int]]:
    """(shape, keys of that shape per layer)."""
    return [((width, width), 4), ((4 * width, width), 1), ((width, 4 * width), 1)]


def realistic_tasks(num_tasks: int, m: int, n: int, seed: int) -> torch.Tensor:
    """Full-rank task matrices with power-law spectra (s_i ~ i^-0.7) and a shared part."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    scale = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7

    def draw() -> torch.Tensor:
        return (torch.randn(m, r, generator=g) * scale) @ torch.randn(r, n, generator=g) / n ** 0.5
    shared = draw()
    return torch.stack([0.5 * shared + draw() for _ in range(num_tasks)])


def ours(method: str, deltas: torch.Tensor) -> torch.Tensor:
    out = get_method(method).fn(deltas)
    if isinstance(out, dict):  # TSV-C: compare the reconstructed per-task matrices
        return torch.einsum("tmk,tk,tkn->tmn", out["U"], out["S"], out["Vh"])
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).norm() / truth.norm())


def measure_key(method: str, shape: tuple[int, int], num_tasks: int, seed: int) -> dict:
    deltas = realistic_tasks(num_tasks, *shape, seed)
    reference = REFERENCES[method]
    with numerics_log() as log:
        fast, fast_s = timed(ours, method, deltas)
    slow, slow_s = timed(reference, deltas, dtype=torch.float32)
    truth = reference(deltas, dtype=torch.float64)
    return {"ours_s": fast_s, "reference_s": slow_s, "fallbacks": len(log.events),
            "ours_err": relative_error(fast, truth), "reference_err": relative_error(slow, truth)}


def io_floor(width: int, layers: int, num_tasks: int, directory: str) -> float:
    """Seconds to read T + 1 checkpoints of this model's matrices and write one."""
    tensors = {}
    for layer in range(layers):
        for i, (shape, count) in enumerate(key_shapes(width)):
            for j in range(count):
                tensors[f"layers.{layer}.m{i}.{j}.weight"] = torch.randn(shape)
    path = os.path.join(directory, "floor.safetensors")
    _, write_s = timed(write_safetensors, path, tensors)
    del tensors

    def read_all() -> None:
        with open_checkpoint(path) as ckpt:
            for key in ckpt.keys():
                ckpt.read(key)
    _, read_s = timed(read_all)
    os.remove(path)
    return (num_tasks + 1) * read_s + write_s


def bench(model: str, num_tasks: int, method: str, keys: int, floor: float) -> dict:
    width, layers = MODELS[model]
    totals = {"ours_s": 0.0, "reference_s": 0.0}
    errors = {"ours_err": 0.0, "reference_err": 0.0}
    fallbacks = 0
    for shape, per_layer in key_shapes(width):
        runs = [measure_key(method, shape, num_tasks, seed) for seed in range(keys)]
        for name in totals:
            totals[name] += layers * per_layer * sum(r[name] for r in runs) / keys
        for name in errors:
            errors[name] = max(errors[name], *(r[name] for r in runs))
        fallbacks += sum(r["fallbacks"] for r in runs)
    return {"model": model, "T": num_tasks, "method": method,
            "reference_s": round(totals["reference_s"], 1), "ours_s": round(totals["ours_s"], 1),
            "speedup": f"{totals['reference_s'] / totals['ours_s']:.2f}x",
            "floor_s": round(floor, 1), "ours/floor": f"{totals['ours_s'] / floor:.1f}x",
            "ours_max_err": f"{errors['ours_err']:.1e}",
            "reference_max_err": f"{errors['reference_err']:.1e}",
            "fallbacks": fallbacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-b-32,vit-l-14")
    parser.add_argument("--tasks", default="8,20")
    parser.add_argument("--methods", default="tsv_m,iso_cts,iso_c,tsv_c")
    parser.add_argument("--keys", type=int, default=1, help="keys measured per shape")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tmp", default=None, help="where the I/O floor file is written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as directory:
        for model in args.models.split(","):
            for num_tasks in [int(t) for t in args.tasks.split(",")]:
                # The floor depends on the model and T only: one measurement for all methods.
                floor = io_floor(*MODELS[model], num_tasks, directory)
                for method in args.methods.split(","):
                    rows.append(bench(model, num_tasks, method, args.keys, floor))
                    print(rows[-1], flush=True)
    print(f"\n{torch.get_num_threads()} threads, {args.keys} key(s) per shape\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
