"""The evaluation worker: one model in memory, weights swapped in place, counts out.

The same class runs in-process and as a Ray actor (`pool.py` wraps it), which is what makes
"actor-pool counts equal single-process counts" a property of the code, not of luck: both run
this method over the same fixed batches with the same thread count.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.io.reader import open_checkpoint
from pipeline.models.vit import ClipVisionTower, VisionConfig, pixels_from_uint8
from pipeline.models.weights import Weights, aligned, load_state, parameters

# Fixed evaluation batch: shards are whole batches, so a shard's logits never depend on which
# worker (or how many) computed it.
EVAL_BATCH = 100


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of one task split, with its frozen head."""

    task: str
    split: str
    start: int
    stop: int


def read_tensors(location: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(location) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys()}


class Evaluator:
    """Holds theta_0 once; evaluates (weights, shard) work items."""

    def __init__(self, base: str, device: str = "cpu", threads: int = 1,
                 cache_size: int = 2):
        self.device = torch.device(device)
        self.threads = threads
        torch.set_num_threads(threads)
        config = VisionConfig.from_model_dir(base)
        self.model = ClipVisionTower(config)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' typing
        stored = read_tensors(base)
        load_state(self.model, stored, base)
        self.params = parameters(self.model)
        self.theta0 = {k: v.detach().clone() for k, v in self.params.items()}
        self.current = Weights.base()
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    def pid(self) -> int:
        return os.getpid()

    def _stored(self, path: str) -> dict[str, torch.Tensor]:
        """The tensors at `path`, keyed like the model; a few kept (LRU) across items."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        tensors = aligned(self.params, read_tensors(path), path)
        self._cache[path] = tensors
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
            tau = self._stored(weights.path)
            for key, param in self.params.items():
                if param.is_floating_point():
                    torch.add(self.theta0[key], tau[key], alpha=weights.alpha, out=param)
        elif weights.kind == "model":
            for key, value in self._stored(weights.path).items():
                self.params[key].copy_(value)
        else:
            raise ValueError(f"unknown weights kind {weights.kind!r}")
        self.current = weights

    @torch.inference_mode()
    def count(self, weights: Weights, shard: RowRange,
              split: tuple[np.ndarray, np.ndarray, torch.Tensor]) -> tuple[int, int]:
        """(correct, total) of top-1 predictions on the shard's rows of `split`
        (images, labels, head)."""
        torch.set_num_threads(self.threads)  # a reused Ray worker keeps its last setting
        self.set_weights(weights)
        images = split[0][shard.start:shard.stop]
        labels = split[1][shard.start:shard.stop]
        head = split[2].to(self.device)
        correct = 0
        for i in range(0, len(labels), EVAL_BATCH):
            x = pixels_from_uint8(torch.tensor(images[i:i + EVAL_BATCH]))
            embeds = self.model.embed(x.to(self.device))
            # Argmax of the cosine logits; the positive scale cannot change it.
            pred = (torch.nn.functional.normalize(embeds, dim=-1) @ head.T).argmax(-1).cpu()
            correct += int((pred == torch.tensor(labels[i:i + EVAL_BATCH]))
                           .sum())
        return correct, int(len(labels))
