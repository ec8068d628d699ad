"""Writers of small evaluation datasets in the layouts users really hold, for the tests.

Each writer mirrors what its producer writes (checked against the `datasets` source, which is
not installed here): `push_to_hub`'s parquet shards with the `huggingface` schema metadata,
`save_to_disk`'s Arrow IPC streams with state.json / dataset_info.json / dataset_dict.json,
and torchvision ImageFolder trees. Each returns what it wrote, so a test compares against
bytes it did not read back through the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

Samples = dict[str, list[tuple[Image.Image, int]]]
Written = dict[str, list[tuple[bytes, int]]]

# `datasets`' ArrowWriter batch size for tables with an Image feature
# (config.ARROW_RECORD_BATCH_SIZE_FOR_IMAGE_DATASETS).
ARROW_IMAGE_BATCH = 100
# The Image feature's storage type (features/image.py: Image.pa_type).
IMAGE_TYPE = pa.struct({"bytes": pa.binary(), "path": pa.string()})


def sample_images(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    """`n` deterministic RGB images: a colour gradient with a random rectangle, so encodings
    differ from image to image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    images = []
    for _ in range(n):
        tint = rng.uniform(0.2, 1.0, size=3)
        pixels = np.empty((size, size, 3), dtype=np.float64)
        pixels[..., 0] = ramp[None, :] * tint[0]
        pixels[..., 1] = ramp[:, None] * tint[1]
        pixels[..., 2] = (255 - ramp[None, :]) * tint[2]
        x0, y0 = rng.integers(0, size // 2, size=2)
        w, h = rng.integers(2, size // 2 + 1, size=2)
        pixels[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3)
        images.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    return images


def labelled(n: int, num_classes: int, size: int = 16, seed: int = 0
             ) -> list[tuple[Image.Image, int]]:
    """`n` sample images with labels cycling through the classes (every class present)."""
    return [(image, i % num_classes) for i, image in enumerate(sample_images(n, size, seed))]


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def hf_features(classnames: Sequence[str]) -> dict:
    """`Features({"image": Image(), "label": ClassLabel(names=...)}).to_dict()`: dataclass
    fields at their defaults are left out (utils/py_utils.asdict), `_type` always kept."""
    return {"image": {"_type": "Image"},
            "label": {"names": list(classnames), "_type": "ClassLabel"}}


def hf_schema(classnames: Sequence[str]) -> pa.Schema:
    """`Features.arrow_schema` (and ArrowWriter._build_metadata without a fingerprint): the
    columns plus `{"huggingface": json.dumps({"info": {"features": ...}})}`."""
    metadata = {"huggingface": json.dumps({"info": {"features": hf_features(classnames)}})}
    return pa.schema([("image", IMAGE_TYPE), ("label", pa.int64())]).with_metadata(metadata)


def _table(records: Sequence[tuple[bytes, int]], names: Sequence[str | None],
           schema: pa.Schema) -> pa.Table:
    images = [{"bytes": data, "path": name} for (data, _), name in zip(records, names)]
    return pa.table({"image": pa.array(images, type=IMAGE_TYPE),
                     "label": pa.array([label for _, label in records], type=pa.int64())},
                    schema=schema)


def _contiguous_shards(n: int, shards: int) -> list[tuple[int, int]]:
    """`Dataset.shard(num_shards, index, contiguous=True)` bounds; never more shards than
    rows (save_to_disk: num_shards = min(len(self.data), num_shards))."""
    shards = max(1, min(n, shards))
    div, mod = divmod(n, shards)
    bounds, start = [], 0
    for index in range(shards):
        stop = start + div + (1 if index < mod else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def write_hf_parquet(root: str | os.PathLike, splits: Samples, classnames: Sequence[str],
                     shards: int = 2, row_group_size: int = 100, image_format: str = "PNG",
                     layout: Literal["data", "root", "single"] = "data") -> Written:
    """A Hugging Face parquet repo as `push_to_hub` uploads it: `data/{split}-0000k-of-0000n
    .parquet` (layout "root": the shards in `root` itself; "single": one `{split}.parquet`),
    written like ParquetDatasetWriter (image column uncompressed, PLAIN, no dictionary; page
    index; content-defined chunking) with `row_group_size` rows per row group."""
    root = str(root)
    folder = os.path.join(root, "data") if layout == "data" else root
    os.makedirs(folder, exist_ok=True)
    schema = hf_schema(classnames)
    written: Written = {}
    for split, samples in splits.items():
        records = [(encode(image, image_format), label) for image, label in samples]
        names = [f"{split}_{i:05d}.{image_format.lower()}" for i in range(len(records))]
        bounds = _contiguous_shards(len(records), 1 if layout == "single" else shards)
        for index, (start, stop) in enumerate(bounds):
            name = (f"{split}.parquet" if layout == "single"
                    else f"{split}-{index:05d}-of-{len(bounds):05d}.parquet")
            writer = pq.ParquetWriter(
                os.path.join(folder, name), schema,
                compression={"image": "none", "label": "snappy"}, use_dictionary=["label"],
                column_encoding={"image": "PLAIN"}, write_page_index=True,
                use_content_defined_chunking={"min_chunk_size": 256 * 1024,
                                              "max_chunk_size": 1024 * 1024, "norm_level": 0})
            with writer:
                for offset in range(start, stop, row_group_size):
                    end = min(offset + row_group_size, stop)
                    writer.write_table(_table(records[offset:end], names[offset:end], schema),
                                       row_group_size=row_group_size)
        written[split] = records
    return written


def write_save_to_disk(root: str | os.PathLike, splits: Samples, classnames: Sequence[str],
                       shards: int = 1, batch_size: int = ARROW_IMAGE_BATCH,
                       image_format: str = "PNG", as_dict: bool = True) -> Written:
    """What `DatasetDict.save_to_disk(root, num_shards=...)` writes: dataset_dict.json
    `{"splits": [...]}` and per split a folder with `data-0000k-of-0000n.arrow` (Arrow IPC
    *streams*, record batches of `batch_size` rows, schema with the `huggingface` metadata),
    state.json (sorted keys, indent 2, `_data_files` in shard order) and dataset_info.json.
    `as_dict=False` with one split: a bare `Dataset.save_to_disk(root)`."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    if not as_dict and len(splits) != 1:
        raise ValueError("a bare Dataset has exactly one split")
    schema = hf_schema(classnames)
    written: Written = {}
    for split, samples in splits.items():
        folder = os.path.join(root, split) if as_dict else root
        os.makedirs(folder, exist_ok=True)
        records = [(encode(image, image_format), label) for image, label in samples]
        bounds = _contiguous_shards(len(records), shards)
        files = [f"data-{i:05d}-of-{len(bounds):05d}.arrow" for i in range(len(bounds))]
        for name, (start, stop) in zip(files, bounds):
            table = _table(records[start:stop], [None] * (stop - start), schema)
            with pa.OSFile(os.path.join(folder, name), "wb") as sink, \
                    pa.RecordBatchStreamWriter(sink, schema) as writer:
                writer.write_table(table, max_chunksize=batch_size)
        state: dict[str, object] = {"_data_files": [{"filename": name} for name in files],
                 "_fingerprint": hashlib.sha256(f"{root}/{split}".encode()).hexdigest()[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": split}
        with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = {"citation": "", "description": "", "features": hf_features(classnames),
                "homepage": "", "license": ""}
        with open(os.path.join(folder, "dataset_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        written[split] = records
    if as_dict:
        with open(os.path.join(root, "dataset_dict.json"), "w", encoding="utf-8") as f:
            json.dump({"splits": list(splits)}, f)
    return written


def image_name(index: int, image_format: str = "PNG") -> str:
    """A file name whose sorted order is not the writing order (ImageFolder sorts)."""
    return f"img_{(index * 7919) % 10007:05d}.{image_format.lower()}"


def write_image_folder(root: str | os.PathLike, splits: Samples, classnames: Sequence[str],
                       image_format: str = "PNG", subfolder_every: int = 0
                       ) -> dict[str, list[tuple[str, bytes, str]]]:
    """A torchvision ImageFolder tree `root/<split>/<class name>/<image>`; with
    `subfolder_every` k, every k-th image of a class goes one folder deeper (`<class>/extra/`),
    which ImageFolder also takes. Returns per split (relative path, bytes, class name) in
    writing order; labels are for the reader to derive from the sorted class names."""
    root = str(root)
    written: dict[str, list[tuple[str, bytes, str]]] = {}
    for split, samples in splits.items():
        records = []
        for i, (image, label) in enumerate(samples):
            parts = [split, classnames[label]]
            if subfolder_every and i % subfolder_every == subfolder_every - 1:
                parts.append("extra")
            relative = "/".join([*parts, image_name(i, image_format)])
            data = encode(image, image_format)
            os.makedirs(os.path.join(root, *parts), exist_ok=True)
            with open(os.path.join(root, relative), "wb") as f:
                f.write(data)
            records.append((relative, data, classnames[label]))
        written[split] = records
    return written
