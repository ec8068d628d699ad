"""A built suite in the users' format: Hugging Face parquet splits, head tensor files and a
task manifest, so the built-in benchmark is evaluated by exactly the code that evaluates a
user's own tasks (one code path, one set of bugs).

Images are stored as PNG (lossless): CLIP's transform at the suite's input size leaves a
32x32 image as it is, so evaluation sees the very pixels the suite was trained on.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.evaluation.manifest import (
    DataSpec,
    HeadSpec,
    Manifest,
    SplitsSpec,
    TaskSpec,
    write_manifest,
)
from pipeline.io.output import write_file_atomic
from pipeline.io.safetensors_io import write_safetensors

MANIFEST_NAME = "manifest.yaml"
EVAL_SPLITS = {"val": "validation", "test": "test"}  # suite split -> parquet split name
ROW_GROUP = 256


def png_bytes(images: np.ndarray) -> list[bytes]:
    """(N, 3, S, S) uint8 images, each as a PNG file's bytes (lossless)."""
    encoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


def hf_image_table(images: Sequence[bytes], labels: np.ndarray, classnames: Sequence[str],
                   suffix: str = "png") -> pa.Table:
    """Encoded images and their labels as a Hugging Face `datasets` parquet table: `image`
    struct {bytes, path} and `label`, class names in the schema metadata."""
    encoded = [{"bytes": data, "path": f"{i:06d}.{suffix}"} for i, data in enumerate(images)]
    features = {"image": {"_type": "Image"},
                "label": {"names": list(classnames), "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    return pa.table({"image": encoded, "label": labels.astype(np.int64)}, schema=schema)


def write_parquet(location: str, table: pa.Table) -> None:
    def write(fh) -> None:
        pq.write_table(table, fh, row_group_size=ROW_GROUP)
    write_file_atomic(location, write)


def export_suite(root: str, tasks: Sequence[str], classes: Mapping[str, Sequence[str]],
                 heads: Mapping[str, torch.Tensor], logit_scale: float,
                 splits: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """Write `eval/<task>/data/<split>-00000-of-00001.parquet`, `heads/<task>.safetensors`
    (the frozen head times the logit scale, applied to normalised embeddings: CLIP's
    zero-shot head convention) and `manifest.yaml` under `root` (paths relative to it)."""
    specs = []
    for task in tasks:
        data_dir = os.path.join(root, "eval", task, "data")
        os.makedirs(data_dir, exist_ok=True)
        for split, name in EVAL_SPLITS.items():
            images, labels = splits[task][split]
            write_parquet(os.path.join(data_dir, f"{name}-00000-of-00001.parquet"),
                          hf_image_table(png_bytes(images), labels, classes[task]))
        os.makedirs(os.path.join(root, "heads"), exist_ok=True)
        weight = (heads[task].float() * logit_scale).contiguous()
        write_safetensors(os.path.join(root, "heads", f"{task}.safetensors"),
                          {"weight": weight}, {"normalize": "true"})
        specs.append(TaskSpec(
            name=task, data=DataSpec(location=f"eval/{task}", format="parquet"),
            splits=SplitsSpec(test="test", validation="validation"),
            head=HeadSpec(file=f"heads/{task}.safetensors"), finetuned=f"finetuned/{task}"))
    write_manifest(os.path.join(root, MANIFEST_NAME),
                   Manifest(base="pretrained", preprocess="clip", tasks=specs))
