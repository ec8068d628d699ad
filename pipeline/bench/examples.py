"""Synthetic CLIP-style ViT checkpoints with the real key layouts, for the demo and benchmarks.

Nothing is downloaded. The base model has the exact keys and shapes of a CLIP vision tower in
either layout (Hugging Face `CLIPVisionModel` or open_clip's `visual.*`); each "fine-tuned"
model adds what fine-tuning adds in practice: a low-rank update with a decaying spectrum per
matrix plus small dense noise. That is the structure the SVD methods exploit, so merges of these
checkpoints exercise the same numerics as real ones (real accuracy needs the evaluation suite).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pipeline.io.output import write_json_atomic
from pipeline.io.safetensors_io import write_safetensors


@dataclass(frozen=True)
class VitShape:
    width: int
    layers: int
    patch: int
    image: int
    output_dim: int

    @property
    def positions(self) -> int:
        return (self.image // self.patch) ** 2 + 1


VIT_SHAPES = {
    "tiny": VitShape(width=64, layers=2, patch=8, image=32, output_dim=32),
    "demo": VitShape(width=192, layers=6, patch=16, image=112, output_dim=128),
    "vit-b-32": VitShape(width=768, layers=12, patch=32, image=224, output_dim=512),
    "vit-l-14": VitShape(width=1024, layers=24, patch=14, image=224, output_dim=768),
}


def vit_shapes(shape: VitShape, layout: str = "hf") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a CLIP vision tower (HF `CLIPVisionModel` or open_clip `visual`)."""
    d, f = shape.width, 4 * shape.width
    if layout == "open_clip":
        keys = {"visual.class_embedding": (d,), "visual.positional_embedding": (shape.positions, d),
                "visual.conv1.weight": (d, 3, shape.patch, shape.patch),
                "visual.ln_pre.weight": (d,), "visual.ln_pre.bias": (d,),
                "visual.ln_post.weight": (d,), "visual.ln_post.bias": (d,),
                "visual.proj": (d, shape.output_dim)}
        for i in range(shape.layers):
            p = f"visual.transformer.resblocks.{i}."
            keys.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                         p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
                         p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
                         p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                         p + "mlp.c_fc.weight": (f, d), p + "mlp.c_fc.bias": (f,),
                         p + "mlp.c_proj.weight": (d, f), p + "mlp.c_proj.bias": (d,)})
        return keys
    v = "vision_model."
    keys = {v + "embeddings.class_embedding": (d,),
            v + "embeddings.patch_embedding.weight": (d, 3, shape.patch, shape.patch),
            v + "embeddings.position_embedding.weight": (shape.positions, d),
            v + "pre_layrnorm.weight": (d,), v + "pre_layrnorm.bias": (d,),
            v + "post_layernorm.weight": (d,), v + "post_layernorm.bias": (d,)}
    for i in range(shape.layers):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys.update({f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)})
        keys.update({p + "layer_norm1.weight": (d,), p + "layer_norm1.bias": (d,),
                     p + "mlp.fc1.weight": (f, d), p + "mlp.fc1.bias": (f,),
                     p + "mlp.fc2.weight": (d, f), p + "mlp.fc2.bias": (d,),
                     p + "layer_norm2.weight": (d,), p + "layer_norm2.bias": (d,)})
    return keys


def base_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("weight") and ("norm" in key or "ln_" in key):
            weights[key] = 1 + 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1] if len(shape) > 1 else shape[0]
            weights[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return weights


def finetune_like(base: dict[str, torch.Tensor], seed: int, rank: int = 8,
                  scale: float = 0.05, noise: float = 0.002) -> dict[str, torch.Tensor]:
    """base + a low-rank update with a decaying spectrum + dense noise, per tensor."""
    gen = torch.Generator().manual_seed(seed)
    tuned = {}
    for key, w in sorted(base.items()):
        delta = noise * w.std() * torch.randn(w.shape, generator=gen)
        if w.dim() == 2:
            m, n = w.shape
            k = min(rank, m, n)
            spectrum = scale * w.norm() * torch.logspace(0, -1.5, k)
            u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
            delta += (u * spectrum) @ v.T
        tuned[key] = w + delta
    return tuned


def write_example(root: str, shape: VitShape | str = "demo", num_tasks: int = 8,
                  layout: str = "hf", seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> tuple[str, list[str]]:
    """Write base + `num_tasks` fine-tuned checkpoints under `root` (reused when present).
    Returns (base path, fine-tuned paths), each an HF-style directory."""
    shape = VIT_SHAPES[shape] if isinstance(shape, str) else shape
    shapes = vit_shapes(shape, layout)
    base = base_weights(shapes, seed)
    paths = []
    for index in range(num_tasks + 1):
        name = "base" if index == 0 else f"task{index:02d}"
        directory = os.path.join(root, name)
        paths.append(directory)
        if os.path.exists(os.path.join(directory, "model.safetensors")):
            continue
        os.makedirs(directory, exist_ok=True)
        weights = base if index == 0 else finetune_like(base, seed * 1000 + index)
        write_safetensors(os.path.join(directory, "model.safetensors"),
                          {k: v.to(dtype) for k, v in weights.items()})
        write_json_atomic(os.path.join(directory, "config.json"), _config(shape, layout))
    return paths[0], paths[1:]


def _config(shape: VitShape, layout: str) -> dict:
    if layout == "open_clip":
        return {"model_cfg": {"embed_dim": shape.output_dim, "vision_cfg": {
            "image_size": shape.image, "layers": shape.layers, "width": shape.width,
            "patch_size": shape.patch}}}
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": shape.width, "intermediate_size": 4 * shape.width,
            "num_hidden_layers": shape.layers, "num_attention_heads": max(1, shape.width // 64),
            "image_size": shape.image, "patch_size": shape.patch, "num_channels": 3,
            "projection_dim": shape.output_dim, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5}
