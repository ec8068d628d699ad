"""How the suite's checkpoints are made: CLIP-like pre-training, then fine-tuning per task
with the classification head frozen (as the papers' checkpoints were fine-tuned against fixed
zero-shot text heads).

Pre-training is self-supervised on the mixture of every task's images: predict which domain an
image comes from and how it was rotated (RotNet). That gives features that are broad but not
aligned with any task's classes, so the zero-shot heads built on them are weak and fine-tuning
has real work to do. Everything is seeded and runs with a fixed thread count, so a build is
reproducible on the same machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.vit import ClipVisionTower, pixels_from_uint8


def _schedule(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 10% of steps, cosine decay after."""
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def cosine_logits(embeds: torch.Tensor, head: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's classifier: scaled cosine similarity to each class embedding."""
    return logit_scale * F.normalize(embeds, dim=-1) @ head.T


def pretrain(model: ClipVisionTower, domains: list[np.ndarray], steps: int, batch: int,
             lr: float, seed: int) -> list[float]:
    """Train `model` on (domain, rotation) prediction over the images of every domain."""
    gen = np.random.default_rng(seed)
    classes = 4 * len(domains)
    probe = torch.nn.Linear(model.config.projection_dim, classes)
    torch.manual_seed(seed)
    torch.nn.init.normal_(probe.weight, std=model.config.projection_dim ** -0.5)
    torch.nn.init.zeros_(probe.bias)
    params = list(model.parameters()) + list(probe.parameters())
    opt = _optimizer(params, lr, weight_decay=0.05)
    sizes = np.array([len(d) for d in domains])
    losses = []
    model.train()
    for step in range(steps):
        which = gen.integers(0, len(domains), batch)
        rows = (gen.random(batch) * sizes[which]).astype(np.int64)
        images = torch.from_numpy(np.stack([domains[d][r] for d, r in zip(which, rows)]))
        turns = gen.integers(0, 4, batch)
        images = torch.stack([torch.rot90(img, int(k), dims=(1, 2))
                              for img, k in zip(images, turns)])
        target = torch.from_numpy(which * 4 + turns)
        for group in opt.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        loss = F.cross_entropy(probe(model.embed(pixels_from_uint8(images))), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.inference_mode()
def embed(model: ClipVisionTower, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    model.eval()
    out = [model.embed(pixels_from_uint8(torch.from_numpy(images[i:i + batch])))
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def zero_shot_head(model: ClipVisionTower, images: np.ndarray, labels: np.ndarray,
                   num_classes: int) -> torch.Tensor:
    """Class embeddings from the *pre-trained* model: the normalised mean embedding of each
    class's training images. It plays the role of CLIP's text-encoder head: fixed before any
    fine-tuning, in the pre-trained embedding space."""
    feats = F.normalize(embed(model, images), dim=-1)
    target = torch.from_numpy(labels)
    head = torch.stack([feats[target == c].mean(0) for c in range(num_classes)])
    return F.normalize(head, dim=-1).contiguous()


def finetune(model: ClipVisionTower, head: torch.Tensor, logit_scale: float,
             images: np.ndarray, labels: np.ndarray, steps: int, batch: int, lr: float,
             seed: int) -> list[float]:
    """Fine-tune every encoder weight with the head frozen."""
    gen = np.random.default_rng(seed)
    opt = _optimizer(model.parameters(), lr, weight_decay=0.1)
    losses = []
    model.train()
    for step in range(steps):
        rows = gen.integers(0, len(labels), batch)
        x = pixels_from_uint8(torch.from_numpy(images[rows]))
        for group in opt.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        loss = F.cross_entropy(cosine_logits(model.embed(x), head, logit_scale),
                               torch.from_numpy(labels[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
