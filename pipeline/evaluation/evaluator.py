"""The evaluation worker: one model in memory, weights swapped in place, counts out.

The same class runs in-process and as a Ray actor (`pool.py` wraps it), which is what makes
"actor-pool counts equal single-process counts" a property of the code, not of luck: both run
this method over the same fixed batches with the same thread count.

A work item names only (weights, task, split, row range): the evaluator reads those rows
itself (parquet row groups by byte range, through pyarrow's filesystems), and a background
thread decodes and preprocesses the next batch while the model runs on this one, so the model
does not wait on JPEG decoding and the driver never holds images.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.evaluation.datasets import Example, read_examples
from pipeline.evaluation.preprocess import Preprocess
from pipeline.evaluation.tasks import EvalTask
from pipeline.io import storage
from pipeline.io.reader import open_checkpoint
from pipeline.models.loading import PROJECTION_KEY, canonical_tensors, embedding_dim, load_vision
from pipeline.models.vit import ClipVisionTower, VisionConfig
from pipeline.models.weights import Weights, aligned, parameters

# Fixed evaluation batch: shards are whole batches, so a shard's logits never depend on which
# worker (or how many) computed it.
EVAL_BATCH = 100
# Batches decoded ahead of the model: enough to hide decoding jitter, few enough to bound
# memory (a ViT-L batch of 100 uint8 images at 224 px is 15 MB).
PREFETCH_BATCHES = 2
PRECISIONS = ("fp32", "bf16")
# Decoding threads per evaluator. On CPU one: the actor's model holds its one core, and a
# second decoder would only take it away. On a GPU the model outruns one decoder by an order of
# magnitude (ViT-B/32: thousands of images/s against ~300 JPEG decodes/s per thread), and PIL
# releases the GIL while decoding and resizing, so several threads decode in parallel.
GPU_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class RowRange:
    """Positions [start, stop) of one task split's rows."""

    task: str
    split: str
    start: int
    stop: int


def check_heads(base: str, tasks: Iterable[EvalTask], dim: int | None = None) -> None:
    """Every head must take the embeddings the base model makes (`dim`; read from the base's
    headers when not given)."""
    tasks = list(tasks)
    if not tasks:
        return
    dim = dim if dim is not None else embedding_dim(base)
    for task in tasks:
        if task.head.dim != dim:
            raise InputError(f"task {task.name!r}: {task.head_origin}: the head takes "
                             f"{task.head.dim}-dim embeddings, the model at {base} makes {dim}")


def preprocessing(setting: str, base: str, config: VisionConfig) -> Preprocess:
    """The manifest's `preprocess`: CLIP's evaluation transform at the model's input size
    ("clip"), a `preprocessor_config.json` (a path), or "auto": the base model directory's own
    `preprocessor_config.json` when it has one, CLIP's transform otherwise."""
    if setting == "clip":
        return Preprocess.clip(config.image_size)
    if setting == "auto":
        candidate = storage.join(base, "preprocessor_config.json")
        if not storage.exists(candidate):
            return Preprocess.clip(config.image_size)
        setting = candidate
    return Preprocess.from_preprocessor_config(setting)


class Evaluator:
    """Holds theta_0 once; evaluates (weights, shard) work items."""

    def __init__(self, base: str, tasks: Mapping[str, EvalTask] | None = None,
                 preprocess: str = "auto",
                 device: str = "cpu", threads: int = 1, precision: str = "fp32",
                 cache_size: int = 2, decode_threads: int | None = None):
        self.device = torch.device(device)
        self.threads = threads
        torch.set_num_threads(threads)
        if precision not in PRECISIONS:
            raise InputError(f"evaluation precision must be one of {PRECISIONS}")
        if precision == "bf16" and self.device.type != "cuda":
            raise InputError("bf16 evaluation is a GPU option (autocast on CUDA)")
        self.precision = precision
        self.decode_threads = decode_threads or (GPU_DECODE_THREADS if self.device.type == "cuda"
                                                 else 1)
        loaded = load_vision(base)
        self.config = loaded.config
        self.model = ClipVisionTower(loaded.config)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' typing
        self.params = parameters(self.model)
        with torch.no_grad():
            for key, value in aligned(self.params, loaded.tensors, base).items():
                self.params[key].copy_(value)
        self.theta0 = {k: v.detach().clone() for k, v in self.params.items()}
        self.current = Weights.base()
        self.tasks = dict(tasks or {})
        check_heads(base, self.tasks.values(), loaded.config.projection_dim)
        self.heads = {name: task.head.to(self.device) for name, task in self.tasks.items()}
        self.preprocess = preprocessing(preprocess, base, loaded.config)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        # A Ray actor may run two calls at once (one decoding ahead): the model is one.
        self._model_lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def _stored(self, weights: Weights) -> dict[str, torch.Tensor]:
        """The tensors of `weights`, keyed like the model; a few kept (LRU) across items."""
        if weights.path in self._cache:
            self._cache.move_to_end(weights.path)
            return self._cache[weights.path]
        if weights.kind == "model":
            # A fine-tuned vision model without projection is the base's tower fine-tuned: it
            # keeps the base's projection (FusionBench's CLIPVisionModel fine-tunes).
            tensors = load_vision(weights.path, self.config,
                                  self.theta0[PROJECTION_KEY].cpu()).tensors
        else:  # a task vector: the layout of its inputs, without config or buffers
            with open_checkpoint(weights.path) as ckpt:
                stored = {k: ckpt.read(k) for k in ckpt.keys()}
            tensors = canonical_tensors(stored, weights.path)[0]
            if PROJECTION_KEY not in tensors:  # merged from models without projection
                tensors[PROJECTION_KEY] = torch.zeros_like(self.params[PROJECTION_KEY])
        tensors = aligned(self.params, tensors, weights.path)
        self._cache[weights.path] = tensors
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors

    @torch.no_grad()
    def set_weights(self, weights: Weights) -> None:
        if weights == self.current:
            return
        if weights.kind == "base":
            for key, param in self.params.items():
                param.copy_(self.theta0[key])
        elif weights.kind == "delta":
            tau = self._stored(weights)
            for key, param in self.params.items():
                if param.is_floating_point():
                    torch.add(self.theta0[key], tau[key], alpha=weights.alpha, out=param)
        elif weights.kind == "model":
            for key, value in self._stored(weights).items():
                self.params[key].copy_(value)
        else:
            raise ValueError(f"unknown weights kind {weights.kind!r}")
        self.current = weights

    def count(self, weights: Weights, shard: RowRange) -> tuple[int, int]:
        """(correct, total) of top-1 predictions on the shard's rows.

        Decoding starts at once, before the model is free: on a Ray actor that takes two calls
        at a time, the next shard is read and decoded while this one runs on the model."""
        batches = _DecodeAhead(self, shard)
        try:
            with self._model_lock, torch.inference_mode():
                torch.set_num_threads(self.threads)  # a reused Ray worker keeps its setting
                self.set_weights(weights)
                head = self.heads[shard.task]
                correct = total = 0
                autocast = torch.autocast("cuda", torch.bfloat16,
                                          enabled=self.precision == "bf16")
                for pixels, labels in batches:
                    x = pixels.to(self.device, non_blocking=True)
                    with autocast:
                        embeds = self.model.embed(self.preprocess.normalize_batch(x))
                    pred = head.logits(embeds).argmax(-1).cpu()
                    correct += int((pred == labels).sum())
                    total += len(labels)
            return correct, total
        finally:
            batches.close()


class _DecodeAhead:
    """Fixed batches of a shard's rows as (uint8 pixels, labels), read and decoded by a
    background thread up to PREFETCH_BATCHES ahead of the model (PIL releases the GIL while
    decoding and resizing, as torch does while computing). Its errors are re-raised in the
    consumer; `close()` stops it early."""

    def __init__(self, evaluator: Evaluator, shard: RowRange):
        task = evaluator.tasks[shard.task]
        self._task = task
        self._split = task.splits[shard.split]
        self._rows = self._split.rows_between(shard.start, shard.stop)
        self._preprocess = evaluator.preprocess
        self._pin = evaluator.device.type == "cuda"
        self._decoders = evaluator.decode_threads
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="eval-decode", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        task, classes = self._task, self._task.head.num_classes

        def decode(example: Example) -> np.ndarray:
            if not 0 <= example.label < classes:
                raise InputError(f"task {task.name!r}: {example.origin}: label "
                                 f"{example.label} is outside the head's {classes} classes "
                                 f"({task.head_origin})")
            try:
                return self._preprocess.decode(example.image, example.origin)
            except InputError as exc:
                raise InputError(f"task {task.name!r}: {exc}") from None

        try:
            with ThreadPoolExecutor(self._decoders, thread_name_prefix="eval-decode") as pool:
                batch: list[Example] = []
                for example in read_examples(self._split.source, self._rows):
                    if self._stop.is_set():
                        return
                    batch.append(example)
                    if len(batch) == EVAL_BATCH:
                        if not self._put(self._decoded(batch, pool, decode)):
                            return
                        batch = []
                if batch and not self._put(self._decoded(batch, pool, decode)):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _decoded(self, batch: list[Example], pool: ThreadPoolExecutor, decode
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        images = list(pool.map(decode, batch))
        pixels = torch.from_numpy(np.stack(images))
        labels = torch.tensor([e.label for e in batch], dtype=torch.int64)
        return (pixels.pin_memory() if self._pin else pixels), labels




