"""A CLIP vision tower in plain torch, parameter-for-parameter the Hugging Face layout.

Why not import transformers: evaluation runs inside every Ray actor, and the model is a few
dozen lines of torch. The parameter names and the forward pass are those of
`transformers.CLIPVisionModelWithProjection` (pre-norm blocks, quick-GELU, class token, a
bias-free visual projection), so a merged Hugging Face CLIP directory loads here unchanged and
a checkpoint saved here loads there; `tests/test_evaluation.py` checks the outputs agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

# CLIP's input normalisation (the constants its processors use).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """The fields of a Hugging Face `CLIPVisionConfig` that define the computation."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionConfig":
        # A full CLIPConfig nests the vision tower's fields under "vision_config".
        raw = raw.get("vision_config", raw)
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if config.hidden_act not in _ACTIVATIONS:
            raise InputError(f"unsupported hidden_act {config.hidden_act!r}; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise InputError("hidden_size must be a multiple of num_attention_heads")
        return config

    @classmethod
    def from_model_dir(cls, path: str) -> "VisionConfig":
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as fh:
                return cls.from_dict(json.load(fh))
        except FileNotFoundError:
            raise InputError(f"{config_path}: no config.json; evaluation needs the model's "
                             f"architecture (a Hugging Face CLIP vision directory)") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{config_path}: not a valid CLIP vision config ({exc})") from None

    def to_hf_dict(self) -> dict:
        return {**asdict(self), "model_type": "clip_vision_model",
                "architectures": ["CLIPVisionModelWithProjection"]}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class _Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         stride=c.patch_size, bias=False)
        positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class _Attention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn, self.mlp = _Attention(c), _Mlp(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(hidden[:, 0])


class ClipVisionTower(nn.Module):
    """Image -> CLIP image embedding (`CLIPVisionModelWithProjection.image_embeds`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = _VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))


def init_clip_weights(model: ClipVisionTower, seed: int) -> None:
    """CLIP's initialisation (std 0.02 linears, scaled attention/MLP), from one seed."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                fan_in = param[0].numel() if param.dim() > 1 else c.hidden_size
                param.normal_(0.0, fan_in ** -0.5, generator=gen)


def pixels_from_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> CLIP-normalised float32 pixels."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
