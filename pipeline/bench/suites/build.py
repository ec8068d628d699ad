"""Build (or find in the cache) a benchmark suite: data, pre-trained model, heads, and one
fine-tuned checkpoint per task, laid out as Hugging Face CLIP vision directories.

Layout of a built suite directory:
    suite.json                  the spec it was built from, task descriptions, build timings
    pretrained/                 config.json + model.safetensors (theta_0)
    finetuned/<task>/           config.json + model.safetensors (theta_t)
    tasks/<task>.safetensors    training data: head (C x projection_dim), train.images (uint8),
                                train.labels; metadata: classes, logit_scale
    manifest.yaml, eval/, heads/ the evaluation side in the users' format (`export.py`): the
                                suite is evaluated through its manifest like any user's tasks

The directory name carries a digest of the spec, so a changed spec never reuses a stale build,
and it appears atomically (built in a staging directory, then renamed), so concurrent builders
or an interrupted build never leave a half-built suite where a reader could take it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.bench.suites import training
from pipeline.bench.suites.export import export_suite
from pipeline.bench.suites.tasks import SPLITS, TASKS, make_split
from pipeline.errors import InputError
from pipeline.io import storage
from pipeline.io.output import open_staged_output, write_json_atomic
from pipeline.io.reader import open_checkpoint
from pipeline.io.safetensors_io import SafetensorsFile, write_safetensors
from pipeline.models.vit import ClipVisionTower, VisionConfig, init_clip_weights
from pipeline.models.weights import load_state, parameters
from pipeline.runtime.executors import LocalExecutor

# Bump when the meaning of a spec changes (generators, training code), to invalidate caches.
SUITE_RECORD = "suite.json"  # written last: a directory with it is a whole suite
SUITE_FORMAT = 4  # 2: transformers' CLIPVisionModelWithProjection; 3: exported manifest;
# 4: the papers' regime (coarse-caption pre-training, tilted heads, gentle fine-tuning)
# Training runs with fixed thread counts so that a build is reproducible on a machine:
# pre-training in the driver, fine-tuning in one (parallel) job per task.
PRETRAIN_THREADS = 2
FINETUNE_THREADS = 1


@dataclass(frozen=True)
class SuiteSpec:
    """Everything a built suite depends on (see `training` for what the recipe's knobs do)."""

    name: str
    tasks: tuple[str, ...]
    model: VisionConfig
    sizes: tuple[int, int, int]  # examples per split (train, val, test); real data may have fewer
    pretrain_steps: int
    finetune_steps: int
    batch: int = 128
    pretrain_lr: float = 1e-3
    finetune_lr: float = 2e-4
    caption_classes: int = 2          # classes per coarse pre-training caption
    head_tilt_degrees: float = 60.0   # zero-shot heads' angle away from their class means
    logit_scale: float = 100.0  # CLIP's (learned, then clamped) temperature
    seed: int = 0               # pre-training, heads and fine-tuning
    data_seed: int = 0          # the generated images and the real datasets' sampling
    # What `bench` runs by default: the first T tasks for each T (not part of the build).
    bench_counts: tuple[int, ...] = ()

    def digest(self) -> str:
        build = {k: v for k, v in dataclasses.asdict(self).items() if k != "bench_counts"}
        raw = json.dumps({"format": SUITE_FORMAT, "threads": [PRETRAIN_THREADS, FINETUNE_THREADS],
                          **build}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


# The papers' 8, 14 and 20 tasks: each count takes the first T, so 8 and 14 are subsets of 20.
_STANDARD_TASKS = ("digits", "textures", "shapes", "counting", "orientation", "glyphs", "hue",
                   "symmetry",
                   "faces", "photos", "position", "roughness", "blur", "noise",
                   "sizes", "arrows", "patterns", "pie", "colours", "angles")
_STANDARD = SuiteSpec(
    name="standard", tasks=_STANDARD_TASKS,
    model=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64),
    sizes=(1500, 300, 600), pretrain_steps=8000, finetune_steps=300, finetune_lr=5e-4,
    head_tilt_degrees=60.0, bench_counts=(8, 14, 20))

SUITES: dict[str, SuiteSpec] = {
    "standard": _STANDARD,
    # The same tasks and data, trained from other seeds: is a ranking one lucky draw?
    "standard-seed1": dataclasses.replace(_STANDARD, name="standard-seed1", seed=1),
    "tiny": SuiteSpec(
        name="tiny", tasks=("digits", "shapes", "orientation", "hue"),
        model=VisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32),
        sizes=(400, 150, 300), pretrain_steps=150, finetune_steps=50, batch=64,
        finetune_lr=5e-4),
}


def cache_root() -> str:
    return os.environ.get("MERGE_PIPELINE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "merge-pipeline"))


def suite_dir(spec: SuiteSpec, root: str | None = None) -> str:
    return os.path.join(root or cache_root(), "suites", f"{spec.name}-{spec.digest()}")


def get_spec(name: str) -> SuiteSpec:
    try:
        return SUITES[name]
    except KeyError:
        raise InputError(f"unknown suite {name!r}; built-in suites: "
                         f"{', '.join(sorted(SUITES))}") from None


def is_built_suite(directory: str) -> bool:
    """A built suite's directory: its record is written last, so its presence means whole."""
    return os.path.isfile(os.path.join(directory, SUITE_RECORD))


def suite_task_counts(name_or_dir: str) -> tuple[int, tuple[int, ...]]:
    """(its number of tasks, the task counts it benches by default) for a built-in suite's
    name or a built suite's directory (from its record), without building anything."""
    if not is_built_suite(name_or_dir):
        spec = get_spec(name_or_dir)
        return len(spec.tasks), spec.bench_counts
    try:
        with open(os.path.join(name_or_dir, SUITE_RECORD)) as f:
            meta = json.load(f)
        return len(meta["tasks"]), tuple(meta["spec"].get("bench_counts") or ())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{name_or_dir}/{SUITE_RECORD}: not a built suite's record "
                         f"({exc!r})") from None


def ensure_suite(name_or_dir: str, root: str | None = None, executor=None,
                 log=print) -> str:
    """The directory of a built suite: a path to one, or a built-in name (built if needed).

    A `root` that is an object-store URI is a cache every machine of a cluster shares: a suite
    found there is copied into this machine's local cache once (training-side files and the
    returned directory are local); one this machine had to build is uploaded there, whole
    (the output commit protocol, `suite.json` last), for the next machine and the next night.
    Evaluation and bench merges read the shared copy (`shared_suite_dir`), which every node
    reaches.
    """
    if is_built_suite(name_or_dir):
        return name_or_dir
    spec = get_spec(name_or_dir)
    if root is not None and storage.is_uri(root):
        return _through_shared_cache(spec, root, executor, log)
    final = suite_dir(spec, root)
    if is_built_suite(final):
        return final
    log(f"building suite {spec.name!r} ({len(spec.tasks)} tasks) into {final}")
    try:
        build_suite(spec, final, executor, log)
    except InputError as exc:
        if is_built_suite(final):  # a concurrent builder won
            return final
        raise exc
    return final


def shared_suite_dir(name_or_dir: str, root: str | None) -> str | None:
    """Where a built-in suite lives in a shared (object-store) cache `root`; None for a local
    cache or a suite given by its directory. Evaluation reads the suite from there, so every
    node of a cluster without a shared filesystem reaches the same files."""
    if root is None or not storage.is_uri(root) or \
            is_built_suite(name_or_dir):
        return None
    return storage.join(storage.join(root, "suites"),
                        os.path.basename(suite_dir(get_spec(name_or_dir))))


def _through_shared_cache(spec: SuiteSpec, root: str, executor, log) -> str:
    local = suite_dir(spec)
    shared = str(shared_suite_dir(spec.name, root))
    shared_has_it = storage.exists(storage.join(shared, SUITE_RECORD))
    if not is_built_suite(local):
        if shared_has_it:
            log(f"fetching suite {spec.name!r} from {shared}")
            with open_staged_output(local, overwrite=True, commit_point=SUITE_RECORD) as out:
                storage.copy_tree(shared, out.path)
                out.commit()
        else:
            ensure_suite(spec.name, None, executor, log)
    if not shared_has_it:
        log(f"uploading suite {spec.name!r} to {shared}")
        with open_staged_output(shared, overwrite=True, commit_point=SUITE_RECORD) as out:
            storage.copy_tree(local, out.path)
            out.commit()
    return local


def save_model(model: ClipVisionTower, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in parameters(model).items()}
    write_safetensors(os.path.join(directory, "model.safetensors"), state)
    write_json_atomic(os.path.join(directory, "config.json"), model.vision_config.to_hf_dict())


def build_suite(spec: SuiteSpec, final: str, executor=None, log=print) -> dict[str, Any]:
    executor = executor or LocalExecutor("cpu")
    threads = torch.get_num_threads()
    timings: dict[str, float] = {}
    with open_staged_output(final) as out:
        torch.set_num_threads(PRETRAIN_THREADS)
        try:
            t0 = time.perf_counter()
            data = {t: {s: make_split(t, s, n, spec.data_seed, spec.model.image_size)
                        for s, n in zip(SPLITS, spec.sizes)} for t in spec.tasks}
            timings["data"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            model = ClipVisionTower(spec.model)
            init_clip_weights(model, spec.seed)
            losses = training.pretrain(model, [data[t]["train"] for t in spec.tasks],
                                       spec.pretrain_steps, spec.batch, spec.pretrain_lr,
                                       spec.seed, spec.caption_classes)
            save_model(model, out.file("pretrained"))
            timings["pretrain"] = time.perf_counter() - t0
            log(f"  pre-trained {spec.pretrain_steps} steps in {timings['pretrain']:.0f} s "
                f"(loss {losses[0]:.2f} -> {np.mean(losses[-20:]):.2f})")

            t0 = time.perf_counter()
            os.makedirs(out.file("tasks"))
            heads = {}
            for t in spec.tasks:
                images, labels = data[t]["train"]
                heads[t] = training.zero_shot_head(model, images, labels, len(TASKS[t].classes),
                                                   spec.head_tilt_degrees,
                                                   seed=task_seed(spec, t))
                _write_task(out.file(f"tasks/{t}.safetensors"), t, heads[t], spec.logit_scale,
                            images, labels)
            timings["heads"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            export_suite(out.path, spec.tasks, {t: TASKS[t].classes for t in spec.tasks},
                         heads, spec.logit_scale, data)
            timings["export"] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)

        t0 = time.perf_counter()
        results = executor.map(finetune_task, [(out.path, spec, t) for t in spec.tasks],
                               desc="fine-tune")
        timings["finetune"] = time.perf_counter() - t0
        log(f"  fine-tuned {len(spec.tasks)} tasks x {spec.finetune_steps} steps in "
            f"{timings['finetune']:.0f} s")
        meta = {"name": spec.name, "digest": spec.digest(), "format": SUITE_FORMAT,
                "spec": dataclasses.asdict(spec),
                "tasks": [{"name": t, "classes": list(TASKS[t].classes),
                           "source": TASKS[t].source,
                           "examples": {s: int(len(data[t][s][1])) for s in SPLITS},
                           "finetune_final_loss": r["final_loss"]}
                          for t, r in zip(spec.tasks, results)],
                "timings_s": timings}
        out.write_json(SUITE_RECORD, meta)
        out.commit()
    return meta


def task_seed(spec: SuiteSpec, task: str) -> int:
    """One task's seed (its head's tilt, its fine-tuning), derived from the suite's."""
    return spec.seed * 1000 + spec.tasks.index(task) + 1


def finetune_task(staging: str, spec: SuiteSpec, task: str) -> dict[str, float]:
    """One fine-tuning job (a Ray task when the executor is Ray): theta_0 -> theta_task."""
    torch.set_num_threads(FINETUNE_THREADS)
    model = load_model(os.path.join(staging, "pretrained"))
    with SafetensorsFile(os.path.join(staging, "tasks", f"{task}.safetensors")) as f:
        head, logit_scale = f.read("head"), float(f.metadata["logit_scale"])
        images, labels = f.read("train.images").numpy(), f.read("train.labels").numpy()
    seed = task_seed(spec, task)
    losses = training.finetune(model, head, logit_scale, images, labels,
                               spec.finetune_steps, spec.batch, spec.finetune_lr, seed)
    save_model(model, os.path.join(staging, "finetuned", task))
    return {"final_loss": float(np.mean(losses[-10:]))}


def load_model(directory: str) -> ClipVisionTower:
    model = ClipVisionTower(VisionConfig.from_model_dir(directory))
    with open_checkpoint(directory) as ckpt:
        load_state(model, {k: ckpt.read(k) for k in ckpt.keys()}, directory)
    return model


def _write_task(path: str, task: str, head: torch.Tensor, logit_scale: float,
                images: np.ndarray, labels: np.ndarray) -> None:
    """A task's training side: what fine-tuning reads."""
    tensors = {"head": head.float().contiguous(),
               "train.images": torch.from_numpy(np.ascontiguousarray(images)),
               "train.labels": torch.from_numpy(np.ascontiguousarray(labels))}
    write_safetensors(path, tensors, {"task": task, "logit_scale": repr(logit_scale),
                                      "classes": json.dumps(list(TASKS[task].classes))})
