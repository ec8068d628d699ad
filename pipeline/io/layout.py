"""Key layouts: transformer blocks, split attention, and open_clip <-> Hugging Face CLIP.

Hugging Face CLIP stores attention as separate q/k/v projections; open_clip (and the official
code of both papers) stores one fused `in_proj_weight` of shape (3d, d). The SVD methods are not
separable across rows, so merging the split matrices gives a different model than the papers.
`qkv_fusions` finds the q/k/v triples so the planner can merge them as one (3d, d) matrix and
split the result back under the original keys.

HF also stores the image projection as `visual_projection.weight [D, W]`, the transpose of
open_clip's `visual.proj [W, D]`. Iso-CTS is not transpose-equivariant (its common subspace is
the left singular space), and the papers' results are defined on open_clip's orientation, so
the planner merges such keys transposed (`transposed_vs_open_clip`) and writes them back as
stored.

`CORRESPONDENCES` is the one table of how the two layouts correspond (REAL-FORMATS.md §1);
the planner's knowledge of transposed keys and the state-dict converters `hf_to_open_clip` /
`open_clip_to_hf` are all derived from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.errors import InputError

# "...layers.3.", "...resblocks.11.", "...blocks.0.", "...layer.7.", "...h.2."
_BLOCK = re.compile(r"^(.*?\b(?:layers|resblocks|blocks|layer|h)\.(\d+))\.")
_QKV = re.compile(r"^(?P<prefix>.*)\.q_proj\.(?P<param>weight)$")
# The split projections in the order open_clip concatenates them into `in_proj_*` (dim 0).
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def block_of(key: str) -> tuple[str, int] | None:
    """(block prefix, block index) of a key inside a transformer block, else None."""
    match = _BLOCK.match(key)
    return (match.group(1), int(match.group(2))) if match else None


def group_of(key: str) -> str:
    """Layer group: the block prefix for block keys; otherwise the top-level module, so a
    tower's stem and head (embeddings, norms, projection: small tensors) share one group."""
    block = block_of(key)
    return block[0] if block else key.split(".")[0]


def qkv_fusions(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, str, str]]:
    """Fused name -> (q, k, v) source keys, for every complete 2-D q/k/v weight triple.

    Found by name and shape, not from `CORRESPONDENCES`, so any architecture with
    `*.q_proj/k_proj/v_proj` attention fuses; the order is the table's (`QKV_PARTS`)."""
    fusions = {}
    for key in sorted(shapes):
        match = _QKV.match(key)
        if not match:
            continue
        prefix, param = match["prefix"], match["param"]
        q, k, v = (f"{prefix}.{p}.{param}" for p in QKV_PARTS)
        triple = (q, k, v)
        if all(k in shapes for k in triple) and len({shapes[k][1:] for k in triple}) == 1 \
                and len(shapes[key]) == 2:
            fusions[f"{prefix}.in_proj_{param}"] = triple  # open_clip's name for the fused matrix
    return fusions


def natural_key(name: str) -> list:
    """Sort "layers.10" after "layers.9"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# -- open_clip <-> Hugging Face CLIP: the table ------------------------------------------------
Op = Literal["rename", "fuse", "transpose"]


@dataclass(frozen=True)
class Correspondence:
    """One line of REAL-FORMATS.md §1: an open_clip key and its Hugging Face key(s).

    Names are relative to each library's CLIP model root (open_clip `visual.…`, HF
    `vision_model.…` / `visual_projection.weight`); `{n}` stands for a block index.
    `op` says how the tensors relate: "rename" (same tensor), "fuse" (the open_clip tensor is
    the dim-0 concatenation of the HF ones, listed in q, k, v order; HF -> open_clip fuses,
    open_clip -> HF splits), "transpose" (2-D, each is the other's transpose)."""

    open_clip: str
    hf: tuple[str, ...]
    op: Op
    tower: Literal["vision", "text"] = "vision"


def _rename(open_clip: str, hf: str) -> Correspondence:
    return Correspondence(open_clip, (hf,), "rename")


def _qkv(open_clip: str, hf_attention: str, param: str) -> Correspondence:
    return Correspondence(open_clip, tuple(f"{hf_attention}.{p}.{param}" for p in QKV_PARTS),
                          "fuse")


_OC_BLOCK = "visual.transformer.resblocks.{n}"
_HF_BLOCK = "vision_model.encoder.layers.{n}"

CORRESPONDENCES: tuple[Correspondence, ...] = (
    _rename("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    _rename("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    _rename("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    _rename("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),  # HF's spelling
    _rename("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    _rename(f"{_OC_BLOCK}.ln_1.weight", f"{_HF_BLOCK}.layer_norm1.weight"),
    _rename(f"{_OC_BLOCK}.ln_1.bias", f"{_HF_BLOCK}.layer_norm1.bias"),
    _qkv(f"{_OC_BLOCK}.attn.in_proj_weight", f"{_HF_BLOCK}.self_attn", "weight"),
    _qkv(f"{_OC_BLOCK}.attn.in_proj_bias", f"{_HF_BLOCK}.self_attn", "bias"),
    _rename(f"{_OC_BLOCK}.attn.out_proj.weight", f"{_HF_BLOCK}.self_attn.out_proj.weight"),
    _rename(f"{_OC_BLOCK}.attn.out_proj.bias", f"{_HF_BLOCK}.self_attn.out_proj.bias"),
    _rename(f"{_OC_BLOCK}.ln_2.weight", f"{_HF_BLOCK}.layer_norm2.weight"),
    _rename(f"{_OC_BLOCK}.ln_2.bias", f"{_HF_BLOCK}.layer_norm2.bias"),
    _rename(f"{_OC_BLOCK}.mlp.c_fc.weight", f"{_HF_BLOCK}.mlp.fc1.weight"),
    _rename(f"{_OC_BLOCK}.mlp.c_fc.bias", f"{_HF_BLOCK}.mlp.fc1.bias"),
    _rename(f"{_OC_BLOCK}.mlp.c_proj.weight", f"{_HF_BLOCK}.mlp.fc2.weight"),
    _rename(f"{_OC_BLOCK}.mlp.c_proj.bias", f"{_HF_BLOCK}.mlp.fc2.bias"),
    _rename("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    _rename("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    Correspondence("visual.proj", ("visual_projection.weight",), "transpose"),
    # The text tower's projection is transposed likewise. Only the planner uses this line: the
    # converters are for the vision tower and drop text keys (see `_OPEN_CLIP_DROPPED`).
    Correspondence("text_projection", ("text_projection.weight",), "transpose", tower="text"),
)

# HF names (relative to the model root) stored as the transpose of their open_clip twin.
HF_TRANSPOSED: tuple[str, ...] = tuple(
    name for row in CORRESPONDENCES if row.op == "transpose" for name in row.hf)

HF_VISION_PREFIX = "vision_model."
# The papers' checkpoints are open_clip `ImageEncoder` state dicts: `model.visual.…`.
OPEN_CLIP_MODEL_PREFIXES = ("", "model.")
# Keys the vision converters drop on purpose: the text tower and CLIP-level keys (a vision
# model has nowhere to put them), and HF's `position_ids`, a derived buffer older
# transformers saved. Anything else that is not in the table is an error, never dropped.
_OPEN_CLIP_DROPPED = re.compile(
    r"^(token_embedding|positional_embedding|transformer|ln_final|text_projection|logit_scale"
    r"|attn_mask)(\.|$)")
_HF_DROPPED = re.compile(
    r"^(text_model|text_projection|logit_scale)(\.|$)|^vision_model\.embeddings\.position_ids$")
_HF_ROOT_NAMES = re.compile(r"^(vision_model|visual_projection|text_model|text_projection"
                            r"|logit_scale)(\.|$)")


def transposed_vs_open_clip(key: str, shape: Sequence[int]) -> bool:
    """Whether a stored key holds the transpose of its open_clip twin (HF's 2-D
    `visual_projection.weight` / `text_projection.weight`, under any outer prefix), so the
    planner merges it transposed: in the orientation the papers' results are defined on."""
    return len(shape) == 2 and any(key == name or key.endswith("." + name)
                                   for name in HF_TRANSPOSED)


def table_keys(layout: Literal["open_clip", "hf"], num_layers: int) -> list[str]:
    """Every vision key the table defines for a tower of `num_layers` blocks, in table order
    (open_clip names under `visual.`, HF names as `CLIPVisionModelWithProjection` saves
    them): what a complete conversion produces, for callers that check completeness."""
    keys: list[str] = []
    for row in CORRESPONDENCES:
        if row.tower != "vision":
            continue
        names = (row.open_clip,) if layout == "open_clip" else row.hf
        blocks = [str(n) for n in range(num_layers)] if "{n}" in row.open_clip else [None]
        keys.extend(_fill(name, block) for block in blocks for name in names)
    return keys


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(\d+)") + "$")


_VISION = tuple(row for row in CORRESPONDENCES if row.tower == "vision")
_OPEN_CLIP_PATTERNS = tuple((_template_regex(row.open_clip), row) for row in _VISION)
_HF_PATTERNS = tuple((_template_regex(name), row, part)
                     for row in _VISION for part, name in enumerate(row.hf))


def _fill(template: str, block: str | None) -> str:
    return template.replace("{n}", block) if block is not None else template


def hf_to_open_clip(state: Mapping[str, torch.Tensor], model_prefix: str = ""
                    ) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP vision state dict in open_clip's layout (keys `visual.…`, or
    `model.visual.…` with `model_prefix="model."` as the papers' checkpoints store them).

    Accepts `CLIPVisionModelWithProjection` / `CLIPModel` keys with the `vision_model.` prefix,
    or a transformers 5.x `CLIPVisionModel` without it. q/k/v are fused in q, k, v order,
    `visual_projection.weight` is transposed, everything else is renamed (the tensor itself is
    shared, not copied). Text-tower and CLIP-level keys are dropped (see `_HF_DROPPED`); any
    other key not in `CORRESPONDENCES` raises `InputError` naming it.
    """
    _check_model_prefix(model_prefix)
    canonical: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        # transformers 5.x saves a bare CLIPVisionModel without the `vision_model.` prefix.
        name = key if _HF_ROOT_NAMES.match(key) else HF_VISION_PREFIX + key
        if _HF_DROPPED.match(name):
            continue
        if name in canonical:
            raise InputError(f"{key!r} and {canonical[name][0]!r} are the same Hugging Face "
                             f"key, with and without the {HF_VISION_PREFIX!r} prefix")
        canonical[name] = (key, tensor)
    parts: dict[tuple[Correspondence, str | None], dict[int, torch.Tensor]] = {}
    for name, (key, tensor) in canonical.items():
        row, block, part = _match_hf(name, key)
        parts.setdefault((row, block), {})[part] = tensor
    out = {}
    for (row, block), found in parts.items():
        target = model_prefix + _fill(row.open_clip, block)
        if row.op == "fuse":
            missing = [_fill(n, block) for i, n in enumerate(row.hf) if i not in found]
            if missing:
                raise InputError(f"{missing[0]!r}: missing, but its q/k/v siblings are "
                                 f"present; {target!r} needs all three")
            shapes = {tuple(t.shape[1:]) for t in found.values()}
            if len(shapes) != 1:
                raise InputError(f"{_fill(row.hf[0], block)!r}: q/k/v shapes differ, "
                                 f"cannot fuse them into {target!r}")
            out[target] = torch.cat([found[i] for i in range(len(row.hf))], dim=0)
        elif row.op == "transpose":
            out[target] = _transpose(found[0], _fill(row.hf[0], block))
        else:
            out[target] = found[0]
    return out


def open_clip_to_hf(state: Mapping[str, torch.Tensor], vision_prefix: str = HF_VISION_PREFIX
                    ) -> dict[str, torch.Tensor]:
    """An open_clip CLIP vision state dict in Hugging Face's `CLIPVisionModelWithProjection`
    layout (pass `vision_prefix=""` for a transformers 5.x `CLIPVisionModel`, which then has
    no place for `visual_projection.weight`: drop it yourself).

    Accepts keys `visual.…` or the papers' `model.visual.…` (all keys under `model.` or none).
    `in_proj_*` is split in q, k, v order (the parts are copies, so they can be saved on their
    own), `proj` is transposed, everything else renamed. Text-tower and CLIP-level keys
    (`token_embedding`, `transformer.…`, `ln_final`, `text_projection`, `logit_scale`, …) are
    dropped; any other key not in `CORRESPONDENCES` raises `InputError` naming it.
    """
    model_prefix = "model." if state and all(k.startswith("model.") for k in state) else ""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(model_prefix):]
        match = next(((m, row) for pattern, row in _OPEN_CLIP_PATTERNS
                      if (m := pattern.match(name))), None)
        if match is None:
            if _OPEN_CLIP_DROPPED.match(name):
                continue
            raise InputError(f"{key!r}: not a key of an open_clip CLIP vision tower "
                             f"(see REAL-FORMATS.md §1, `layout.CORRESPONDENCES`)")
        m, row = match
        block = m.group(1) if m.groups() else None
        targets = [_hf_output_name(_fill(n, block), vision_prefix) for n in row.hf]
        if row.op == "fuse":
            if tensor.ndim == 0 or tensor.shape[0] % len(targets):
                raise InputError(f"{key!r}: dim 0 of shape {list(tensor.shape)} does not split "
                                 f"into {len(targets)} equal q/k/v parts")
            out.update(zip(targets, (p.clone() for p in tensor.chunk(len(targets), dim=0))))
        elif row.op == "transpose":
            out[targets[0]] = _transpose(tensor, key)
        else:
            out[targets[0]] = tensor
    return out


def _match_hf(name: str, key: str) -> tuple[Correspondence, str | None, int]:
    for pattern, row, part in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return row, (m.group(1) if m.groups() else None), part
    raise InputError(f"{key!r}: not a key of a Hugging Face CLIP vision model "
                     f"(see REAL-FORMATS.md §1, `layout.CORRESPONDENCES`)")


def _hf_output_name(name: str, vision_prefix: str) -> str:
    if name.startswith(HF_VISION_PREFIX):
        return vision_prefix + name[len(HF_VISION_PREFIX):]
    return name


def _transpose(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if tensor.ndim != 2:
        raise InputError(f"{key!r}: expected a 2-D projection, got shape {list(tensor.shape)}")
    return tensor.T.contiguous()


def _check_model_prefix(model_prefix: str) -> None:
    if model_prefix not in OPEN_CLIP_MODEL_PREFIXES:
        raise InputError(f"open_clip model prefix must be one of {OPEN_CLIP_MODEL_PREFIXES}, "
                         f"got {model_prefix!r}")
