"""Putting checkpoint tensors into the model: key matching, and theta_0 + alpha * tau in place.

Sweeps evaluate one merged task vector at thirty alphas; reloading a model per alpha would
dominate the sweep on a ViT-L. Instead the evaluator keeps theta_0 and tau once and rewrites
the parameters in place (`torch.add(theta_0, tau, alpha=alpha, out=param)`), which is the same
arithmetic in every process, so every evaluator produces the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.errors import InputError

# transformers 5 saves CLIPVisionModel without the `vision_model.` prefix.
_PREFIXES = ("", "vision_model.")


def match_keys(model_keys: list[str], stored: Mapping[str, torch.Tensor], where: str
               ) -> dict[str, str]:
    """model key -> stored key; a clear error naming the first missing key."""
    mapping = {}
    for key in model_keys:
        for prefix in _PREFIXES:
            candidate = key[len(prefix):] if prefix and key.startswith(prefix) else key
            if candidate in stored:
                mapping[key] = candidate
                break
        else:
            raise InputError(f"{where}: key {key!r} is missing; not a CLIP vision checkpoint of "
                             f"this architecture")
    return mapping


def aligned(params: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor],
            where: str) -> dict[str, torch.Tensor]:
    """`stored` re-keyed like `params`, each shape checked, cast to the parameter's dtype and
    device; a clear error naming the first key that does not fit."""
    mapping = match_keys(list(params), stored, where)
    out = {}
    for key, param in params.items():
        value = stored[mapping[key]]
        if tuple(value.shape) != tuple(param.shape):
            raise InputError(f"{where}: key {mapping[key]!r} has shape {tuple(value.shape)}, "
                             f"the model needs {tuple(param.shape)}")
        out[key] = value.to(param.device, param.dtype)
    return out


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds for `model`: its parameters (buffers such as
    transformers' `position_ids` are derived, never stored)."""
    return {name: param.data for name, param in model.named_parameters()}


def load_state(model: torch.nn.Module, stored: Mapping[str, torch.Tensor], where: str) -> None:
    params = parameters(model)
    with torch.no_grad():
        for key, value in aligned(params, stored, where).items():
            params[key].copy_(value)


@dataclass(frozen=True)
class Weights:
    """Which parameters to evaluate: theta_0, theta_0 + alpha * tau (tau stored at `path`), or a
    whole checkpoint at `path` (a fine-tuned model)."""

    kind: str  # "base" | "delta" | "model"
    path: str = ""
    alpha: float = 0.0

    @staticmethod
    def base() -> "Weights":
        return Weights("base")

    @staticmethod
    def delta(path: str, alpha: float) -> "Weights":
        return Weights("delta", path, float(alpha))

    @staticmethod
    def model(path: str) -> "Weights":
        return Weights("model", path)

    def describe(self) -> str:
        return {"base": "theta_0", "delta": f"theta_0 + {self.alpha:g} * tau[{self.path}]",
                "model": self.path}[self.kind]
