"""Zero-shot classification heads from the pre-trained CLIP text tower (FusionBench's way,
and the papers' way of making their heads in the first place): class names and templates
through transformers' `CLIPTextModelWithProjection`, read from the user's full CLIPModel
directory with its tokenizer files. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeline.errors import InputError, one_line
from pipeline.evaluation.heads import Head
from pipeline.io import storage
from pipeline.io.reader import open_checkpoint

_TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def zero_shot_head(clip_dir: str, classnames: Sequence[str], templates: Sequence[str],
                   device: str = "cpu", batch_size: int = 256) -> Head:
    """The zero-shot head of a full Hugging Face CLIPModel directory (local), as both papers
    and FusionBench build it: each class's templates go through the text tower with its
    projection, each embedding is L2-normalised, the mean over templates is re-normalised, and
    the stacked [C, D] matrix is scaled by `logit_scale.exp()`.

    Every sequence is padded to the text tower's full context length, so a class's row does not
    depend on which other texts share its batch."""
    names = _check_classnames(clip_dir, classnames)
    fills = [_template_filler(clip_dir, t) for t in _check_templates(clip_dir, templates)]
    text_config = _check_clip_dir(clip_dir)
    logit_scale = _read_logit_scale(clip_dir)
    model = _load_text_model(clip_dir, text_config).to(device).float().eval()
    tokenizer = _load_tokenizer(clip_dir)
    context = int(text_config.max_position_embeddings)
    texts = [fill(name) for name in names for fill in fills]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding="max_length",
                              max_length=context, truncation=True, return_tensors="pt")
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device))
            chunks.append(out.text_embeds.float().cpu())
        embeds = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
        means = embeds.view(len(names), len(fills), -1).mean(dim=1)
        weight = torch.nn.functional.normalize(means, dim=-1) * logit_scale.exp()
    return Head(weight=weight.clone().contiguous(), bias=None, normalize=True)


def _check_classnames(clip_dir: str, classnames: Sequence[str]) -> list[str]:
    names = [classnames] if isinstance(classnames, str) else list(classnames)
    if not names:
        raise InputError(f"{clip_dir}: zero-shot head needs at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise InputError(f"{clip_dir}: class names must be non-empty strings, got {bad[:3]!r}")
    return names


def _check_templates(clip_dir: str, templates: Sequence[str]) -> list[str]:
    found = [templates] if isinstance(templates, str) else list(templates)
    if not found:
        raise InputError(f"{clip_dir}: zero-shot head needs at least one template, e.g. "
                         f"'a photo of a {{}}.'")
    return found


def _template_filler(clip_dir: str, template: Any) -> Callable[[str], str]:
    """Templates name the class with `{}` or `{c}`; plain replacement (not str.format), so
    other braces in a template stay as written."""
    if not isinstance(template, str) or ("{}" not in template and "{c}" not in template):
        raise InputError(f"{clip_dir}: zero-shot template {template!r} has no '{{}}' or "
                         f"'{{c}}' placeholder for the class name")
    return lambda name: template.replace("{c}", name).replace("{}", name)


def _check_clip_dir(clip_dir: str) -> Any:
    """The directory's CLIP text config, or one line on what is missing. `projection_dim` is
    taken from the top level, which is what CLIPModel sizes `text_projection` with."""
    from transformers import CLIPConfig

    if storage.is_uri(clip_dir):
        raise InputError(f"{clip_dir}: the CLIP model for zero-shot heads must be a local "
                         f"directory")
    if not os.path.isdir(clip_dir):
        raise InputError(f"{clip_dir}: no such directory (expected a Hugging Face CLIPModel "
                         f"directory with config.json, weights and tokenizer files)")
    config_path = os.path.join(clip_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{clip_dir}: no config.json; expected a Hugging Face CLIPModel "
                         f"directory") from None
    except ValueError as exc:
        raise InputError(f"{config_path}: not valid JSON ({one_line(exc)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "clip" or not isinstance(raw.get("text_config"), dict):
        raise InputError(f"{clip_dir}: no text tower (config.json model_type {model_type!r}); "
                         f"a zero-shot head needs the full CLIPModel directory (model_type "
                         f"'clip' with text_config), not a vision-only model")
    missing_tokenizer = [" and ".join(s) for s in _TOKENIZER_SETS
                         if not all(os.path.isfile(os.path.join(clip_dir, n)) for n in s)]
    if len(missing_tokenizer) == len(_TOKENIZER_SETS):
        raise InputError(f"{clip_dir}: no tokenizer files (expected vocab.json and merges.txt, "
                         f"or tokenizer.json)")
    if not any(os.path.isfile(os.path.join(clip_dir, n)) for n in _WEIGHT_FILES):
        raise InputError(f"{clip_dir}: no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    try:
        config = CLIPConfig.from_pretrained(clip_dir, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{config_path}: not a valid CLIP config ({one_line(exc)})") from None
    text_config: Any = config.text_config
    text_config.projection_dim = config.projection_dim
    return text_config


def _read_logit_scale(clip_dir: str) -> torch.Tensor:
    """`logit_scale` lives outside the text tower, so read it straight from the weights."""
    with open_checkpoint(clip_dir) as ckpt:
        if "logit_scale" not in ckpt.keys():
            raise InputError(f"{clip_dir}: no logit_scale tensor; a zero-shot head needs the "
                             f"full CLIPModel checkpoint")
        value = ckpt.read("logit_scale")
    if value.numel() != 1 or not value.is_floating_point():
        raise InputError(f"{clip_dir}: logit_scale has shape {tuple(value.shape)} and dtype "
                         f"{value.dtype}, expected one float")
    return value.detach().float().reshape(())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers reports the vision weights a text model skips as a warning table and shows
    a progress bar; neither is news here. Restores the caller's settings afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_text_model(clip_dir: str, text_config: Any) -> torch.nn.Module:
    """Only the text tower and its projection (the vision tower's weights are skipped): every
    one of their weights must come from the checkpoint, none left at random init."""
    from transformers import CLIPTextModelWithProjection

    try:
        with _quiet_transformers():
            loaded: Any = CLIPTextModelWithProjection.from_pretrained(
                clip_dir, config=text_config, local_files_only=True, output_loading_info=True,
                dtype=torch.float32)
        model, info = loaded
    except Exception as exc:
        raise InputError(f"{clip_dir}: cannot load the CLIP text tower ({one_line(exc)})") \
            from None
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        shown = ", ".join(map(str, missing[:4])) + (" ..." if len(missing) > 4 else "")
        raise InputError(f"{clip_dir}: the checkpoint lacks text-tower weights ({shown}); a "
                         f"zero-shot head needs the full CLIPModel checkpoint")
    return model


def _load_tokenizer(clip_dir: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{clip_dir}: cannot load the tokenizer ({one_line(exc)})") from None
