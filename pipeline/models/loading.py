"""Any real CLIP vision checkpoint, in one canonical layout, with its architecture.

Users hold CLIP vision weights in several layouts: Hugging Face `CLIPVisionModelWithProjection`
(`vision_model.…`, `visual_projection.weight`), a transformers 5.x `CLIPVisionModel` (the same
without the prefix and without a projection), a full `CLIPModel` (plus the text tower), and
open_clip state dicts (`visual.…`, the papers' `model.visual.…`, plus text keys) — the last
often with no config.json at all. Evaluation runs one model class (`ClipVisionTower`), so
everything is mapped here to its parameter names, and the architecture is read from config.json
where there is one and from the tensor shapes where there is not.

The open_clip <-> Hugging Face correspondence lives in `pipeline.io.layout` (one table); this
module only decides which layout a checkpoint is in and reuses that table's converter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.errors import InputError
from pipeline.io import storage
from pipeline.io.layout import HF_VISION_PREFIX, open_clip_to_hf
from pipeline.io.reader import open_checkpoint
from pipeline.models.vit import ClipVisionTower, VisionConfig

# Layout names, for reports and error messages.
HF = "hf"
HF_UNPREFIXED = "hf-unprefixed"
CLIP_MODEL = "clip-model"
OPEN_CLIP = "open_clip"
OPEN_CLIP_MODEL_PREFIX = "open_clip-model-prefix"
# Appended to the layout when a vision model without projection got an identity projection.
IDENTITY_PROJECTION = "+identity-projection"
BASE_PROJECTION = "+base-projection"

PROJECTION_KEY = "visual_projection.weight"
_EMBED = HF_VISION_PREFIX + "embeddings."
CLASS_EMBEDDING = _EMBED + "class_embedding"
PATCH_EMBEDDING = _EMBED + "patch_embedding.weight"
POSITION_EMBEDDING = _EMBED + "position_embedding.weight"
_BLOCK_INDEX = re.compile(r"^(vision_model\.encoder\.layers\.)(\d+)\.")
FC1 = HF_VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"
# The keys whose shapes define the architecture, and their ranks.
_INFERRED_FROM = ((CLASS_EMBEDDING, 1), (PATCH_EMBEDDING, 4), (POSITION_EMBEDDING, 2), (FC1, 2))
# OpenAI CLIP's attention head width: every OpenAI / open_clip ViT-B and ViT-L uses 64.
HEAD_WIDTH = 64

# A transformers 5.x `CLIPVisionModel` saves these roots without `vision_model.`.
_HF_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
# Keys of a full CLIPModel the vision tower has no place for (text tower, CLIP-level), and
# the derived `position_ids` buffer older transformers saved: dropped, never an error.
_HF_TEXT = re.compile(r"^(text_model|text_projection|logit_scale)(\.|$)")
_POSITION_IDS = re.compile(r"^(vision_model\.)?embeddings\.position_ids$")
# Fields a checkpoint's shapes cannot tell: from config.json, the `config` argument, or
# OpenAI CLIP's values.
_SHAPELESS_FIELDS = ("num_attention_heads", "hidden_act", "layer_norm_eps")


@dataclass(frozen=True)
class LoadedVision:
    """A CLIP vision checkpoint ready for `ClipVisionTower(config)`: `tensors` has exactly the
    tower's parameter names (float tensors, dtype as stored); `layout` says what it was read
    from, for reports and errors."""

    config: VisionConfig
    tensors: dict[str, torch.Tensor]
    layout: str


# -- keys --------------------------------------------------------------------------------------
def _layout_of(key: str) -> str | None:
    """The layout a vision key belongs to; None for keys that tell nothing (text tower,
    CLIP-level keys, `visual_projection.weight`, buffers) or that nobody knows."""
    if key.startswith("model.visual."):
        return OPEN_CLIP_MODEL_PREFIX
    if key.startswith("visual."):
        return OPEN_CLIP
    if key.startswith(HF_VISION_PREFIX) and not _POSITION_IDS.match(key):
        return HF
    if key.startswith(_HF_UNPREFIXED_ROOTS) and not _POSITION_IDS.match(key):
        return HF_UNPREFIXED
    return None


def canonical_tensors(tensors: Mapping[str, torch.Tensor], where: str
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """`tensors` under `ClipVisionTower`'s parameter names, and the layout they came in.

    Only maps the keys it is given (no completeness check), so a task vector — which has its
    inputs' keys, and whose conversion is linear (rename, split, transpose) — maps the same way
    as a model. Text-tower and CLIP-level keys and `position_ids` buffers are dropped. Keys of
    two layouts at once, or of none, raise `InputError` naming `where` and the first offending
    key.
    """
    votes: dict[str, list[str]] = {}
    for key in sorted(tensors):
        layout = _layout_of(key)
        if layout is not None:
            votes.setdefault(layout, []).append(key)
    if not votes:
        if PROJECTION_KEY in tensors:  # a task vector of the projection only
            votes[HF] = []
        else:
            found = f"first key {min(tensors)!r}" if tensors else "no keys at all"
            raise InputError(f"{where}: no CLIP vision keys ({found}); expected Hugging Face "
                             f"`vision_model.…` or open_clip `visual.…` keys")
    layout = max(votes, key=lambda name: len(votes[name]))  # ties: the first seen in key order
    others = sorted(k for name, keys in votes.items() if name != layout for k in keys)
    if others:
        raise InputError(f"{where}: key {others[0]!r} is in the {_layout_of(others[0])} layout "
                         f"but most keys are {layout}; a checkpoint must use one layout")
    try:
        if layout in (OPEN_CLIP, OPEN_CLIP_MODEL_PREFIX):
            return _from_open_clip(tensors, layout, where), layout
        return _from_hf(tensors, layout, where)
    except InputError as exc:
        if str(exc).startswith(where):
            raise
        raise InputError(f"{where}: {exc}") from None


def _from_open_clip(tensors: Mapping[str, torch.Tensor], layout: str, where: str
                    ) -> dict[str, torch.Tensor]:
    if layout == OPEN_CLIP_MODEL_PREFIX:
        # The papers' ImageEncoder state dicts put every key under `model.`; the converter
        # strips the prefix only when all keys have it, so say which one does not.
        stray = sorted(k for k in tensors if not k.startswith("model."))
        if stray:
            raise InputError(f"{where}: key {stray[0]!r} lacks the `model.` prefix the other "
                             f"open_clip keys have")
    return open_clip_to_hf(tensors)  # vision keys converted, text keys dropped, others an error


def _from_hf(tensors: Mapping[str, torch.Tensor], layout: str, where: str
             ) -> tuple[dict[str, torch.Tensor], str]:
    known = frozenset(_hf_names(1))
    out: dict[str, torch.Tensor] = {}
    clip_model = False
    for key in sorted(tensors):
        if _POSITION_IDS.match(key):
            continue
        if _HF_TEXT.match(key):
            clip_model = True
            continue
        name = key if key == PROJECTION_KEY or layout == HF else HF_VISION_PREFIX + key
        if _BLOCK_INDEX.sub(r"\g<1>0.", name) not in known:  # any block: block 0's names
            raise InputError(f"{where}: key {key!r} is not a key of a Hugging Face CLIP vision "
                             f"model ({layout} layout; see REAL-FORMATS.md §1)")
        out[name] = tensors[key]
    if clip_model and layout == HF:
        layout = CLIP_MODEL
    return out, layout


def _layer_count(keys: list[str]) -> int:
    """1 + the highest block index among canonical keys (0 without blocks)."""
    indices = [int(m.group(2)) for key in keys if (m := _BLOCK_INDEX.match(key))]
    return max(indices, default=-1) + 1


@functools.lru_cache(maxsize=8)
def _hf_names(num_layers: int) -> tuple[str, ...]:
    """Every parameter name of a tower with `num_layers` blocks, in the tower's order: the
    one-block tower's names with its block repeated (other fields do not change names, and
    a bogus block index in a file must not build a model that large)."""
    template = tuple(_expected_shapes(VisionConfig(
        hidden_size=HEAD_WIDTH, intermediate_size=HEAD_WIDTH, num_hidden_layers=1,
        num_attention_heads=1, image_size=1, patch_size=1, projection_dim=1)))
    if num_layers == 1:
        return template
    block = [n for n in template if _BLOCK_INDEX.match(n)]
    start = template.index(block[0])
    repeated = [_BLOCK_INDEX.sub(rf"\g<1>{i}.", n) for i in range(num_layers) for n in block]
    return template[:start] + tuple(repeated) + template[start + len(block):]


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    """`ClipVisionTower(config)`'s parameters and shapes, in its order: the model itself
    (built on the meta device, so no memory and no time) is the reference, not a copy of it."""
    with torch.device("meta"):
        model = ClipVisionTower(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# -- architecture ------------------------------------------------------------------------------
def _read_config(location: str) -> dict:
    try:
        raw = json.loads(storage.read_bytes(location))
    except ValueError as exc:
        raise InputError(f"{location}: not valid JSON ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("vision_config", {}), dict):
        raise InputError(f"{location}: expected a CLIP (vision) config object")
    return raw


def _config_from_file(raw: dict, location: str, projection_rows: int | None,
                      borrowed: bool = False) -> VisionConfig:
    """The config.json's architecture, with the projection dim the tensors have: a CLIPModel
    keeps it at the top level (its `vision_config` may carry a stale default), and a bare
    CLIPVisionModel's `projection_dim` describes no tensor at all."""
    try:
        config = VisionConfig.from_dict(raw)
    except InputError as exc:
        raise InputError(f"{location}: {exc}") from None
    except (TypeError, ZeroDivisionError) as exc:
        raise InputError(f"{location}: not a valid CLIP vision config ({exc})") from None
    if projection_rows is None:
        return dataclasses.replace(config, projection_dim=config.hidden_size)
    declared = raw["projection_dim"] if "vision_config" in raw else raw.get("projection_dim")
    if declared is not None and declared != projection_rows and not borrowed:
        raise InputError(f"{location}: projection_dim is {declared}, but "
                         f"{PROJECTION_KEY!r} has {projection_rows} rows")
    return dataclasses.replace(config, projection_dim=projection_rows)


def _config_from_shapes(tensors: Mapping[str, torch.Tensor], where: str,
                        given: VisionConfig | None) -> VisionConfig:
    """The architecture the tensor shapes define; the fields no shape tells (heads,
    activation, norm epsilon) from `given`, else OpenAI CLIP's (head width 64, quick_gelu,
    1e-5)."""
    for name, ndim in _INFERRED_FROM:
        if tensors[name].ndim != ndim:
            raise InputError(f"{where}: key {name!r} has shape {list(tensors[name].shape)}, "
                             f"expected {ndim} dimensions")
    hidden = tensors[CLASS_EMBEDDING].shape[0]
    patch = tensors[PATCH_EMBEDDING].shape
    positions = tensors[POSITION_EMBEDDING].shape[0] - 1
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise InputError(f"{where}: {POSITION_EMBEDDING!r} has {positions + 1} rows, not a "
                         f"square grid of patches plus the class token")
    if given is not None:
        shapeless = {f: getattr(given, f) for f in _SHAPELESS_FIELDS}
    else:
        if hidden % HEAD_WIDTH:
            raise InputError(f"{where}: hidden size {hidden} is not a multiple of CLIP's head "
                             f"width {HEAD_WIDTH}; add a config.json with num_attention_heads")
        shapeless = {"num_attention_heads": hidden // HEAD_WIDTH, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5}
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=tensors[FC1].shape[0],
        num_hidden_layers=_layer_count(list(tensors)),
        image_size=grid * patch[-1],
        patch_size=patch[-1],
        num_channels=patch[1],
        projection_dim=_projection_rows(tensors, where) or hidden,
        **shapeless)


def _first_difference(a: VisionConfig, b: VisionConfig, skip: tuple[str, ...] = ()
                      ) -> str | None:
    return next((f.name for f in dataclasses.fields(a)
                 if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)), None)


def _projection_rows(tensors: Mapping[str, torch.Tensor], where: str) -> int | None:
    projection = tensors.get(PROJECTION_KEY)
    if projection is None:
        return None
    if projection.ndim != 2:
        raise InputError(f"{where}: key {PROJECTION_KEY!r} has shape {list(projection.shape)}, "
                         f"expected a 2-D [projection_dim, hidden_size] matrix")
    return int(projection.shape[0])


def _check_keys(tensors: Mapping[str, torch.Tensor], num_layers: int, where: str) -> None:
    """Every parameter of a `num_layers` tower present (the projection aside: the caller
    supplies one when missing), and nothing else."""
    blocks = {int(m.group(2)) for key in tensors if (m := _BLOCK_INDEX.match(key))}
    # Names only up to the first absent block: a bogus block count never lists every key.
    absent = next((i for i in range(num_layers) if i not in blocks), None)
    names = _hf_names(num_layers if absent is None else absent + 1)
    missing = [n for n in names if n not in tensors and n != PROJECTION_KEY]
    if missing:  # always, when a block is absent
        raise InputError(f"{where}: key {missing[0]!r} is missing; not a complete CLIP vision "
                         f"model with {num_layers} blocks")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise InputError(f"{where}: key {extra[0]!r} is beyond the {num_layers} blocks the "
                         f"architecture has")


def load_vision(location: str, config: VisionConfig | None = None,
                projection: torch.Tensor | None = None) -> LoadedVision:
    """Read a CLIP vision checkpoint in any layout users hold (see module docstring), local or
    a URI, into `ClipVisionTower`'s names, with its architecture.

    The architecture comes from the directory's config.json when there is one, else from the
    tensor shapes. `config` is the architecture the caller needs (the evaluator's base): the
    checkpoint's must equal it (InputError naming the first differing field), and it supplies
    the fields shapes cannot tell when there is no config.json. A vision model without
    projection gets `projection_dim = hidden_size` and an identity `visual_projection.weight`,
    so its image embeddings are its pooled output, exactly; unless the caller passes the
    base's `projection`: a fine-tuned `CLIPVisionModel` (FusionBench's) is the base CLIPModel's
    vision tower fine-tuned, and evaluates and merges with the base's projection.
    """
    with open_checkpoint(location) as ckpt:
        # Non-float entries are buffers (`position_ids`), never parameters: not even read.
        stored = {k: ckpt.read(k) for k in ckpt.keys() if ckpt.spec(k).is_float}
        config_location = ckpt.config_location
    tensors, layout = canonical_tensors(stored, location)
    if projection is not None and PROJECTION_KEY not in tensors:
        tensors[PROJECTION_KEY] = projection
        layout += BASE_PROJECTION
    projection_rows = _projection_rows(tensors, location)
    found: VisionConfig | None = None
    if config_location is not None:
        found = _config_from_file(_read_config(config_location), config_location,
                                  projection_rows, layout.endswith(BASE_PROJECTION))
    # config.json declares the block count, so a missing block is named as a missing key;
    # without one, the blocks present are the architecture (compared with `config` below).
    _check_keys(tensors, found.num_hidden_layers if found else _layer_count(list(tensors)),
                location)
    from_shapes = _config_from_shapes(tensors, location, config or found)
    if found is not None:
        differs = _first_difference(found, from_shapes, skip=_SHAPELESS_FIELDS)
        if differs:
            raise InputError(f"{config_location}: {differs} is {getattr(found, differs)}, but "
                             f"the tensors have {getattr(from_shapes, differs)}")
    else:
        found = from_shapes
    if config is not None:
        differs = _first_difference(found, config)
        if differs:
            raise InputError(f"{location}: {differs} is {getattr(found, differs)}, but the base "
                             f"model has {getattr(config, differs)}; every model evaluated "
                             f"must have the base's architecture")
    if projection_rows is None:
        reference = tensors[CLASS_EMBEDDING]
        tensors[PROJECTION_KEY] = torch.eye(found.hidden_size, dtype=reference.dtype)
        layout += IDENTITY_PROJECTION
    expected = _expected_shapes(found)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{location}: key {name!r} has shape {list(tensors[name].shape)}, "
                             f"the architecture needs {list(shape)}")
    return LoadedVision(found, {name: tensors[name] for name in expected}, layout)


def embedding_dim(location: str) -> int:
    """The dimension of the image embeddings the model at `location` makes, from its headers
    alone (no tensor read): the driver checks heads against it before any actor loads the
    model. A model without projection embeds in its width."""
    with open_checkpoint(location) as ckpt:
        specs = ckpt.specs()
    for key, spec in specs.items():
        if key == PROJECTION_KEY or key.endswith("." + PROJECTION_KEY):
            return spec.shape[0]  # HF: [D, W]
        if key in ("visual.proj", "model.visual.proj"):
            return spec.shape[1]  # open_clip: [W, D]
    for key, spec in specs.items():
        if key.endswith("class_embedding"):
            return spec.shape[0]
    raise InputError(f"{location}: no CLIP vision keys (no projection, no class embedding)")
