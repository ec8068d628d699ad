"""How the suite's checkpoints are made: CLIP-like pre-training, zero-shot heads that are good
but misaligned, then gentle fine-tuning per task with the head frozen (as the papers'
checkpoints were fine-tuned against fixed zero-shot text heads).

The papers' regime, where merging recovers most of what fine-tuning gained, rests on weight
disentanglement: fine-tuning on one task barely changes the model on another. It comes from
pre-training that already holds every task's features, so that fine-tuning only has to align
them with the head. Three choices here make it so, each measured (`merge-pipeline regime`):

- **Pre-training on coarse captions.** CLIP's captions name roughly what an image shows; ours
  name which task's domain an image comes from and which *pair* of that task's classes it
  belongs to, with a cosine classifier as CLIP's contrastive head. The features then separate
  every task's classes well, while telling the two classes of a pair apart is left to
  fine-tuning. (Self-supervised pre-training on domain and rotation gave features so far from
  the tasks that fine-tuning had to move every weight: adding another task's vector pushed a
  task to near chance.)
- **Misaligned heads.** CLIP's text heads point near, not at, the images of their class. A
  head here is the class's mean embedding under the pre-trained model, tilted by a fixed angle
  towards a seeded random direction orthogonal to it; the angle sets zero-shot accuracy.
- **Gentle fine-tuning:** every encoder weight, a learning rate well below pre-training's,
  a few hundred steps, weight decay and gradient clipping, head frozen.

Everything is seeded and runs with a fixed thread count, so a build is reproducible on the same
machine.
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


# The pre-training classifier's temperature (CLIP learns one; a fixed one suffices here).
PRETRAIN_LOGIT_SCALE = 20.0


def coarse_captions(labels: np.ndarray, classes_per_caption: int) -> np.ndarray:
    """A task's labels as pre-training sees them: consecutive classes share a caption."""
    return labels // classes_per_caption


def pretrain(model: ClipVisionTower, domains: list[tuple[np.ndarray, np.ndarray]],
             steps: int, batch: int, lr: float, seed: int, classes_per_caption: int
             ) -> list[float]:
    """Train `model` to name each image's (domain, coarse caption) over every domain's
    training images, with a cosine classifier over all domains' captions."""
    gen = np.random.default_rng(seed)
    captions = [coarse_captions(labels, classes_per_caption) for _, labels in domains]
    offsets = np.cumsum([0] + [int(c.max()) + 1 for c in captions])
    torch.manual_seed(seed)
    prototypes = torch.nn.Parameter(torch.randn(int(offsets[-1]), model.config.projection_dim))
    params = list(model.parameters()) + [prototypes]
    opt = _optimizer(params, lr, weight_decay=0.05)
    sizes = np.array([len(c) for c in captions])
    losses = []
    model.train()
    for step in range(steps):
        which = gen.integers(0, len(domains), batch)
        rows = (gen.random(batch) * sizes[which]).astype(np.int64)
        images = torch.from_numpy(np.stack([domains[d][0][r] for d, r in zip(which, rows)]))
        target = torch.from_numpy(np.array([offsets[d] + captions[d][r]
                                            for d, r in zip(which, rows)], dtype=np.int64))
        for group in opt.param_groups:
            group["lr"] = _schedule(step, steps, lr)
        loss = F.cross_entropy(cosine_logits(model.embed(pixels_from_uint8(images)),
                                             F.normalize(prototypes, dim=-1),
                                             PRETRAIN_LOGIT_SCALE), target)
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
                   num_classes: int, tilt_degrees: float, seed: int) -> torch.Tensor:
    """Class embeddings from the *pre-trained* model, playing CLIP's text heads: fixed before
    any fine-tuning, in the pre-trained embedding space, near but not at each class's images.
    Each row is the normalised mean embedding of the class's training images, turned by
    `tilt_degrees` towards a random direction orthogonal to it (seeded)."""
    feats = F.normalize(embed(model, images), dim=-1)
    target = torch.from_numpy(labels)
    means = F.normalize(torch.stack([feats[target == c].mean(0) for c in range(num_classes)]),
                        dim=-1)
    away = torch.randn(means.shape, generator=torch.Generator().manual_seed(seed))
    away = F.normalize(away - (away * means).sum(1, keepdim=True) * means, dim=-1)
    angle = math.radians(tilt_degrees)
    return F.normalize(math.cos(angle) * means + math.sin(angle) * away, dim=-1).contiguous()


FINETUNE_WEIGHT_DECAY = 0.1


def finetune(model: ClipVisionTower, head: torch.Tensor, logit_scale: float,
             images: np.ndarray, labels: np.ndarray, steps: int, batch: int, lr: float,
             seed: int) -> list[float]:
    """Fine-tune every encoder weight with the head frozen."""
    gen = np.random.default_rng(seed)
    opt = _optimizer(model.parameters(), lr, weight_decay=FINETUNE_WEIGHT_DECAY)
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
