"""Key layouts: which keys form a transformer block, and how split attention fuses.

Hugging Face CLIP stores attention as separate q/k/v projections; open_clip (and the official
code of both papers) stores one fused `in_proj_weight` of shape (3d, d). The SVD methods are not
separable across rows, so merging the split matrices gives a different model than the papers.
`qkv_fusions` finds the q/k/v triples so the planner can merge them as one (3d, d) matrix and
split the result back under the original keys.
"""

from __future__ import annotations

import re
from typing import Mapping

# "...layers.3.", "...resblocks.11.", "...blocks.0.", "...layer.7.", "...h.2."
_BLOCK = re.compile(r"^(.*?\b(?:layers|resblocks|blocks|layer|h)\.(\d+))\.")
_QKV = re.compile(r"^(?P<prefix>.*)\.q_proj\.(?P<param>weight)$")


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
    """Fused name -> (q, k, v) source keys, for every complete 2-D q/k/v weight triple."""
    fusions = {}
    for key in sorted(shapes):
        match = _QKV.match(key)
        if not match:
            continue
        prefix, param = match["prefix"], match["param"]
        triple = tuple(f"{prefix}.{p}_proj.{param}" for p in "qkv")
        if all(k in shapes for k in triple) and len({shapes[k][1:] for k in triple}) == 1 \
                and len(shapes[key]) == 2:
            fusions[f"{prefix}.in_proj_{param}"] = triple  # open_clip's name for the fused matrix
    return fusions


def natural_key(name: str) -> list:
    """Sort "layers.10" after "layers.9"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
