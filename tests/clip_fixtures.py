"""A tiny, random, fully local Hugging Face CLIP directory for tests (no downloads).

`make_tiny_clip_dir` writes what users hold for a real CLIP (e.g. openai/clip-vit-base-patch32):
`config.json` with `text_config`/`vision_config`, `model.safetensors` of a whole `CLIPModel`
(vision tower included), the byte-level BPE tokenizer files and a preprocessor config. The
tests import it as `from clip_fixtures import make_tiny_clip_dir` (pytest puts tests/ on
sys.path through conftest.py); `tests/test_heads.py` re-exports it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# A few merges, so that the BPE is exercised beyond single characters.
MERGES = (("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("p", "h"),
          ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"))


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters: printable latin-1
    bytes map to themselves, the rest to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab() -> dict[str, int]:
    """Bytes, their word-final forms, the merges, then BOS and EOS as the two last ids (like
    the real CLIP vocab, where EOS has the highest id)."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(directory: str | Path) -> dict[str, int]:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json; returns the
    vocab."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}),
        encoding="utf-8")
    return vocab


def tiny_clip_config(projection_dim: int = 16, hidden_size: int = 32, layers: int = 2,
                     heads: int = 4, image_size: int = 32, patch_size: int = 8,
                     context: int = 77, vocab_size: int | None = None,
                     eos_token_id: int | None = None) -> Any:
    """A CLIPConfig of the given (small) sizes whose special-token ids match `tiny_vocab`.
    `eos_token_id=2` reproduces the OpenAI checkpoints' old config value, with which
    transformers pools at the highest token id instead of at the first EOS."""
    from transformers import CLIPConfig

    vocab = vocab_size if vocab_size is not None else len(tiny_vocab())
    tower = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 projection_dim=projection_dim, hidden_act="quick_gelu")
    return CLIPConfig(
        text_config=dict(tower, vocab_size=vocab, max_position_embeddings=context,
                         bos_token_id=vocab - 2, pad_token_id=vocab - 1,
                         eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim)


def make_tiny_clip_dir(path: str | Path, projection_dim: int = 16, hidden_size: int = 32,
                       layers: int = 2, heads: int = 4, image_size: int = 32,
                       patch_size: int = 8, context: int = 77, seed: int = 0,
                       logit_scale: float = math.log(100.0), tokenizer: bool = True,
                       preprocessor: bool = True, eos_token_id: int | None = None) -> str:
    """Save a random `CLIPModel` (text and vision towers, projections, `logit_scale`) with
    `save_pretrained` into `path`, plus tokenizer files unless `tokenizer=False` and a
    `preprocessor_config.json` (bicubic resize to `image_size`, OpenAI mean/std) unless
    `preprocessor=False`; `eos_token_id` as in `tiny_clip_config`. `logit_scale` differs from
    transformers' init value on purpose, so a reader that takes the config's init value
    instead of the checkpoint's is caught. The global RNG is left untouched. Returns `str(path)`."""
    from transformers import CLIPModel

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(projection_dim, hidden_size, layers, heads, image_size,
                              patch_size, context, eos_token_id=eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(str(directory))
    if tokenizer:
        write_tokenizer_files(directory)
    if preprocessor:
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}), encoding="utf-8")
    return os.fspath(directory)
