"""Compatibility of the base and fine-tuned checkpoints, checked before any math.

Everything here needs only headers, so it costs milliseconds even for ViT-L. Floating dtypes
may differ between checkpoints (an fp32 base with bf16 fine-tunes is common): every input is
upcast to the compute dtype anyway. A floating key can never meet an integer one. Finiteness
needs the data; workers check it on every tensor they read, before using it
(see `engine/worker.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import InputError
from pipeline.io.reader import Checkpoint, TensorSpec
from pipeline.io.safetensors_io import FLOAT_DTYPES

COPIED_DTYPES = ("I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64")


def check_compatible(base: Checkpoint, finetuned: Sequence[Checkpoint]) -> dict[str, TensorSpec]:
    """The base's specs, after checking that every fine-tuned checkpoint matches them."""
    if not finetuned:
        raise InputError("no fine-tuned checkpoints given: merging needs at least one task")
    specs = base.specs()
    if not specs:
        raise InputError(f"{base.location}: checkpoint has no tensors")
    for key, spec in specs.items():
        if spec.dtype not in FLOAT_DTYPES + COPIED_DTYPES:
            raise InputError(f"{base.location}: key {key!r} has dtype {spec.dtype}, which "
                             f"cannot be merged (supported: {', '.join(FLOAT_DTYPES)})")
    for ckpt in finetuned:
        keys = set(ckpt.keys())
        missing, extra = sorted(set(specs) - keys), sorted(keys - set(specs))
        if missing:
            raise InputError(f"{ckpt.location}: missing key {missing[0]!r} that the base has"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise InputError(f"{ckpt.location}: extra key {extra[0]!r} that the base lacks"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for key, spec in specs.items():
            other = ckpt.spec(key)
            if other.shape != spec.shape:
                raise InputError(f"{ckpt.location}: key {key!r} has shape {list(other.shape)}, "
                                 f"base has {list(spec.shape)}")
            if other.dtype != spec.dtype and not (other.is_float and spec.is_float):
                raise InputError(f"{ckpt.location}: key {key!r} has dtype {other.dtype}, "
                                 f"base has {spec.dtype}")
    return specs
