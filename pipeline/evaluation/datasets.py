"""Users' evaluation datasets, read as they lie on disk or in an object store.

Three layouts cover the benchmarks' data as people hold it (REAL-FORMATS.md section 2): Hugging
Face parquet repos (FusionBench's task pools), directories written by `datasets`'
`save_to_disk`, and torchvision ImageFolder trees (the papers' code). Converting them first would
double the storage and drift from the published files, so evaluation reads them in place.

The driver only plans: `open_dataset` reads metadata (parquet footers, Arrow batch row counts,
directory listings) and returns a small picklable `SplitSource` per split, so its memory does
not grow with the dataset. Each evaluation actor then reads its own rows with `read_examples`,
touching only the parquet row groups (byte ranges) or Arrow batches that hold them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.errors import InputError, one_line
from pipeline.io import storage

Kind = Literal["parquet", "arrow", "imagefolder"]
KINDS: tuple[str, ...] = ("parquet", "arrow", "imagefolder")

# torchvision's IMG_EXTENSIONS: the files ImageFolder takes (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# `{split}-00000-of-00004.parquet`, as push_to_hub names shards; older `datasets` releases
# appended a fingerprint (`-<hex>`).
_SHARD = re.compile(r"^(?P<split>.+?)-(?P<index>\d+)-of-\d+(?:-[0-9A-Za-z]+)?\.parquet$",
                    re.IGNORECASE)

_LAYOUTS = ("a Hugging Face parquet dataset (data/{split}-NNNNN-of-NNNNN.parquet), a "
            "`save_to_disk` directory (dataset_dict.json or state.json) or an image folder "
            "(<split>/<class>/<images>)")


@dataclass(frozen=True)
class SplitSource:
    """What an evaluator needs to read any row of one split; small and picklable (sent to
    actors once)."""

    kind: Kind
    files: tuple[str, ...]  # data files in row order (parquet/arrow), or image files
    file_rows: tuple[int, ...]  # rows per file (parquet/arrow); () for imagefolder
    labels: tuple[int, ...] = ()  # imagefolder only: label per file
    image_column: str = "image"
    label_column: str = "label"

    @property
    def num_rows(self) -> int:
        return len(self.files) if self.kind == "imagefolder" else sum(self.file_rows)


@dataclass(frozen=True)
class DatasetInfo:
    location: str
    kind: str
    splits: dict[str, SplitSource]
    classnames: tuple[str, ...] | None  # from metadata / folder names; None if unknown


@dataclass(frozen=True)
class Example:
    row: int  # row index within the split
    image: bytes  # encoded image bytes (JPEG/PNG/...)
    label: int
    origin: str  # "<file> row <k>" or the image file path: for error messages


# ---- planning: metadata only ------------------------------------------------------------------

def open_dataset(location: str, kind: str | None = None, *, split: str | None = None
                 ) -> DatasetInfo:
    """Find the splits, their files and row counts, and the class names of the dataset at
    `location` (a local path or a pyarrow.fs URI), reading metadata only. `kind` None detects
    the layout. `split` names the one split of a bare `save_to_disk` Dataset (default: its
    state.json `_split`, else the directory's name)."""
    if kind is not None and kind not in KINDS:
        raise InputError(f"{location}: unknown dataset format {kind!r}; expected one of "
                         f"{', '.join(KINDS)}")
    if not storage.exists(location):
        raise InputError(f"{location}: no such dataset directory")
    if not storage.is_dir(location):
        if location.lower().endswith(".parquet") and kind in (None, "parquet"):
            name = storage.parent_and_name(location)[1]
            return _parquet_info(location, {_parquet_split(name)[0]: [location]})
        raise InputError(f"{location}: is a file; expected a dataset directory holding "
                         f"{_LAYOUTS}")
    files = storage.list_files(location)
    if not files:
        raise InputError(f"{location}: empty directory; expected {_LAYOUTS}")
    kind = kind or _detect(location, files)
    if kind == "parquet":
        return _parquet_info(location, _parquet_splits(location, files))
    if kind == "arrow":
        return _arrow_info(location, files, split)
    return _imagefolder_info(location, files)


def _top_level(files: Sequence[str]) -> set[str]:
    return {f for f in files if "/" not in f}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _detect(location: str, files: Sequence[str]) -> str:
    """The layout of a directory, from its listing alone."""
    top = _top_level(files)
    if "dataset_dict.json" in top or "state.json" in top:
        return "arrow"
    if _parquet_candidates(files):
        return "parquet"
    if any("/" in f and _is_image(f) for f in files):
        return "imagefolder"
    deeper = sorted({f.rsplit("/", 1)[0] for f in files if f.lower().endswith(".parquet")})
    if deeper:  # e.g. a repo with one folder per config (svhn's cropped_digits/)
        raise InputError(f"{location}: parquet files only in sub-folders "
                         f"({', '.join(deeper[:5])}); point at the folder of one configuration")
    shown = ", ".join(sorted(files)[:5]) + (", ..." if len(files) > 5 else "")
    raise InputError(f"{location}: no recognisable dataset layout (found {shown}); "
                     f"expected {_LAYOUTS}")


def _parquet_candidates(files: Sequence[str]) -> list[str]:
    """Parquet files of a HF repo: its data/ folder's if it has any, else the root's."""
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    in_data = [f for f in parquet if f.startswith("data/") and f.count("/") == 1]
    return in_data or [f for f in parquet if "/" not in f]


def _parquet_split(name: str) -> tuple[str, int]:
    """(split, shard index) of a parquet file name: `{split}-NNNNN-of-NNNNN.parquet` or
    `{split}.parquet`."""
    match = _SHARD.match(name)
    if match:
        return match.group("split"), int(match.group("index"))
    return name[: -len(".parquet")], 0


def _parquet_splits(location: str, files: Sequence[str]) -> dict[str, list[str]]:
    candidates = _parquet_candidates(files)
    if not candidates:
        raise InputError(f"{location}: no parquet files; expected data/{{split}}-NNNNN-of-"
                         f"NNNNN.parquet, {{split}}-NNNNN-of-NNNNN.parquet or {{split}}.parquet")
    keyed: dict[str, list[tuple[int, str]]] = {}
    for relative in candidates:
        split, index = _parquet_split(relative.rsplit("/", 1)[-1])
        keyed.setdefault(split, []).append((index, relative))
    return {split: [storage.join(location, rel) for _, rel in sorted(shards)]
            for split, shards in sorted(keyed.items())}


def _check_columns(origin: str, schema: Any, image: str = "image", label: str = "label") -> None:
    """The image column holds encoded bytes (a `{bytes, path}` struct, as `datasets`' Image
    feature stores them, or plain binary) and the label column integers."""
    import pyarrow as pa

    def binary(t: Any) -> bool:
        return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t))

    names = list(schema.names)
    for column in (image, label):
        if column not in names:
            raise InputError(f"{origin}: no {column!r} column (columns: "
                             f"{', '.join(names) or 'none'}); expected {image!r} (encoded "
                             f"images) and {label!r} (integer class labels)")
    kind = schema.field(image).type
    if not (binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                             and binary(kind.field("bytes").type))):
        raise InputError(f"{origin}: column {image!r} has type {kind}; expected encoded images "
                         f"(struct<bytes: binary, path: string>)")
    kind = schema.field(label).type
    if not pa.types.is_integer(kind):
        raise InputError(f"{origin}: column {label!r} has type {kind}; expected integer "
                         f"class labels")


def _classnames(features: Any, label: str = "label") -> tuple[str, ...] | None:
    """Class names of a `datasets` features dict (`{label: {"_type": "ClassLabel", "names":
    [...]}}`); None when it names none."""
    feature = features.get(label) if isinstance(features, dict) else None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _schema_classnames(schema: Any) -> tuple[str, ...] | None:
    """Class names from the `huggingface` schema metadata that `datasets` writes into parquet
    and Arrow files: `{"info": {"features": ...}}`."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    info = meta.get("info") if isinstance(meta, dict) else None
    return _classnames(info.get("features")) if isinstance(info, dict) else None


def _parquet_info(location: str, splits: dict[str, list[str]]) -> DatasetInfo:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources: dict[str, SplitSource] = {}
    classnames: tuple[str, ...] | None = None
    for split, files in splits.items():
        rows: list[int] = []
        for file in files:
            fs, path = storage.filesystem(file)
            try:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as exc:  # ArrowInvalid: not parquet
                raise InputError(f"{file}: not a readable parquet file ({one_line(exc)})"
                                 ) from None
            schema = meta.schema.to_arrow_schema()
            _check_columns(file, schema)
            classnames = classnames or _schema_classnames(schema)
            rows.append(meta.num_rows)
        sources[split] = SplitSource("parquet", tuple(files), tuple(rows))
    return DatasetInfo(location, "parquet", sources, classnames)


def _read_json(location: str, what: str) -> Any:
    if not storage.exists(location):
        raise InputError(f"{location}: no such file; expected {what}")
    try:
        return json.loads(storage.read_bytes(location))
    except ValueError as exc:
        raise InputError(f"{location}: not valid JSON ({one_line(exc)})") from None


def _arrow_info(location: str, files: Sequence[str], split: str | None) -> DatasetInfo:
    top = _top_level(files)
    if "dataset_dict.json" in top:
        path = storage.join(location, "dataset_dict.json")
        names = _read_json(path, "datasets' DatasetDict index").get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f'{path}: no "splits" list; expected {{"splits": ["train", '
                             f'"test"]}}')
        parts = [(name, _arrow_split(storage.join(location, name))) for name in names]
    elif "state.json" in top:
        state = _read_json(storage.join(location, "state.json"), "datasets' state.json")
        name = split or (state.get("_split") if isinstance(state, dict) else None) \
            or storage.parent_and_name(location.rstrip("/"))[1]
        parts = [(str(name), _arrow_split(location))]
    else:
        raise InputError(f"{location}: no state.json or dataset_dict.json; expected a "
                         f"directory written by datasets' save_to_disk")
    classnames = next((names for _, (_, names) in parts if names), None)
    return DatasetInfo(location, "arrow", {name: src for name, (src, _) in parts}, classnames)


def _arrow_split(directory: str) -> tuple[SplitSource, tuple[str, ...] | None]:
    """One `save_to_disk` split: data files in state.json's order, their batch row counts
    (a memory-mapped local file is counted without touching its image bytes)."""
    state_path = storage.join(directory, "state.json")
    state = _read_json(state_path, "a split written by datasets' save_to_disk (state.json, "
                                   "dataset_info.json, data-NNNNN-of-NNNNN.arrow)")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
        raise InputError(f'{state_path}: no "_data_files" list; expected [{{"filename": '
                         f'"data-00000-of-00001.arrow"}}, ...] as save_to_disk writes it')
    info_path = storage.join(directory, "dataset_info.json")
    classnames = None
    if storage.exists(info_path):
        info = _read_json(info_path, "datasets' dataset_info.json")
        classnames = _classnames(info.get("features") if isinstance(info, dict) else None)
    files = tuple(storage.join(directory, e["filename"]) for e in entries)
    rows = []
    for file in files:
        with _ipc_stream(file) as reader:
            _check_columns(file, reader.schema)
            classnames = classnames or _schema_classnames(reader.schema)
            rows.append(sum(batch.num_rows for batch in _batches(reader, file)))
    return SplitSource("arrow", files, tuple(rows)), classnames


@contextlib.contextmanager
def _ipc_stream(file: str) -> Iterator[Any]:
    """A reader of an Arrow IPC stream file (as `datasets` writes them): memory-mapped when
    local (batches are zero-copy views), a sequential input stream on an object store."""
    import pyarrow as pa

    local = storage.local_path(file)
    try:
        if local is not None:
            source = pa.memory_map(local)
        else:
            fs, path = storage.filesystem(file)
            source = fs.open_input_stream(path)
    except FileNotFoundError:
        raise InputError(f"{file}: no such file (listed in state.json)") from None
    except OSError as exc:
        raise InputError(f"{file}: cannot open ({one_line(exc)})") from None
    try:
        try:
            reader = pa.ipc.open_stream(source)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file}: not an Arrow IPC stream ({one_line(exc)}); expected "
                             f"data-NNNNN-of-NNNNN.arrow as save_to_disk writes them") from None
        yield reader
    finally:
        source.close()


def _batches(reader: Any, file: str) -> Iterator[Any]:
    import pyarrow as pa

    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file}: unreadable Arrow stream ({one_line(exc)})") from None
        yield batch


def _imagefolder_info(location: str, files: Sequence[str]) -> DatasetInfo:
    """torchvision's ImageFolder per split: classes are the sorted class folder names, label =
    index in that order; a class folder's files (sub-folders included) in `make_dataset`'s
    order: folders by path, files by name within each."""
    by_split: dict[str, dict[str, list[str]]] = {}
    loose: set[str] = set()
    for relative in files:
        parts = relative.split("/")
        if len(parts) < 2 or not _is_image(relative):
            continue
        if len(parts) == 2:
            loose.add(parts[0])
        else:
            by_split.setdefault(parts[0], {}).setdefault(parts[1], []).append(relative)
    for split in sorted(loose - set(by_split)):
        raise InputError(f"{storage.join(location, split)}: images but no class folders; "
                         f"expected {split}/<class>/<images>")
    if not by_split:
        raise InputError(f"{location}: no images in <split>/<class>/ folders; expected "
                         f"{_LAYOUTS}")
    classnames: tuple[str, ...] | None = None
    first = ""
    sources: dict[str, SplitSource] = {}
    for split, classes in sorted(by_split.items()):
        names = tuple(sorted(classes))
        if classnames is None:
            classnames, first = names, split
        elif names != classnames:
            raise InputError(f"{storage.join(location, split)}: class folders "
                             f"{', '.join(names)} differ from {first}'s "
                             f"({', '.join(classnames)}); every split needs the same classes, "
                             f"or labels would not match between splits")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(names):
            ordered = sorted(classes[name], key=lambda rel: tuple(rel.rsplit("/", 1)))
            paths.extend(storage.join(location, rel) for rel in ordered)
            labels.extend([label] * len(ordered))
        sources[split] = SplitSource("imagefolder", tuple(paths), (), tuple(labels))
    return DatasetInfo(location, "imagefolder", sources, classnames)


# ---- actors: reading rows ---------------------------------------------------------------------

def read_examples(source: SplitSource, rows: Sequence[int]) -> Iterator[Example]:
    """The examples at `rows` (ascending row indices of the split, possibly sparse), in that
    order. Reads only the parquet row groups / Arrow batches / image files that hold them; the
    label is not range-checked here (the caller knows the head's class count)."""
    wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
    total = source.num_rows
    if len(wanted) and (wanted[0] < 0 or wanted[-1] >= total or np.any(np.diff(wanted) <= 0)):
        raise ValueError(f"rows must be strictly ascending within [0, {total})")
    if source.kind == "imagefolder":
        for row in wanted.tolist():
            path = source.files[row]
            yield Example(row, storage.read_bytes(path), source.labels[row], path)
        return
    starts = np.concatenate([[0], np.cumsum(source.file_rows, dtype=np.int64)])
    file_of = np.searchsorted(starts, wanted, side="right") - 1
    read = _parquet_rows if source.kind == "parquet" else _arrow_rows
    for index in np.unique(file_of).tolist():
        local = wanted[file_of == index] - starts[index]
        yield from read(source, index, local, int(starts[index]))


def _parquet_rows(source: SplitSource, index: int, local: np.ndarray, first: int
                  ) -> Iterator[Example]:
    """Rows `local` of parquet file `index` (its first row is split row `first`): the footer,
    then only the row groups holding them, image and label columns only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = source.files[index]
    fs, path = storage.filesystem(file)
    try:
        handle = fs.open_input_file(path)
    except OSError as exc:
        raise InputError(f"{file}: cannot open ({one_line(exc)})") from None
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{file}: not a readable parquet file ({one_line(exc)})"
                             ) from None
        meta = parquet.metadata
        _same_rows(file, meta.num_rows, source.file_rows[index])
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        group_of = np.searchsorted(group_starts, local, side="right") - 1
        columns = [source.image_column, source.label_column]
        for group in np.unique(group_of).tolist():
            table = parquet.read_row_group(group, columns=columns)
            in_group = local[group_of == group] - group_starts[group]
            yield from _examples(source, table, in_group, file, int(group_starts[group]), first)


def _arrow_rows(source: SplitSource, index: int, local: np.ndarray, first: int
                ) -> Iterator[Example]:
    """Rows `local` of Arrow stream file `index`: batches in order, decoding only those that
    hold requested rows and stopping after the last one."""
    file = source.files[index]
    with _ipc_stream(file) as reader:
        done = 0
        position = 0
        for batch in _batches(reader, file):
            end = position + batch.num_rows
            upto = int(np.searchsorted(local, end, side="left"))
            if upto > done:
                yield from _examples(source, batch, local[done:upto] - position, file, position,
                                     first)
            done, position = upto, end
            if done == len(local):
                return
    _same_rows(file, position, source.file_rows[index])


def _same_rows(file: str, found: int, expected: int) -> None:
    if found != expected:
        raise InputError(f"{file}: has {found} rows, {expected} when the dataset was opened "
                         f"(the file changed since?)")


def _examples(source: SplitSource, data: Any, indices: np.ndarray, file: str, offset: int,
              first: int) -> Iterator[Example]:
    """Examples at `indices` of a table or record batch whose first row is row `offset` of
    `file` (split row `first + offset`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    take = pa.array(indices, type=pa.int64())
    images = data.column(source.image_column).take(take)
    if pa.types.is_struct(images.type):
        images = pc.struct_field(images, "bytes")  # null where the whole struct is null
    labels = data.column(source.label_column).take(take)
    for k, image, label in zip(indices.tolist(), images.to_pylist(), labels.to_pylist()):
        origin = f"{file} row {offset + k}"
        if image is None:
            raise InputError(f"{origin}: no image bytes")
        if label is None:
            raise InputError(f"{origin}: no label")
        yield Example(first + offset + k, image, int(label), origin)


# ---- the papers' validation subset ------------------------------------------------------------

def papers_validation_rows(num_train: int, fraction: float = 0.1, cap: int | None = 5000,
                           seed: int = 0) -> np.ndarray:
    """The train rows the papers validate on, ascending (int64): the second subset of
    `random_split(train, [num_train - v, v], generator=torch.Generator().manual_seed(seed))`
    with v = int(num_train * fraction), at most `cap` (None: no cap, as FusionBench).
    random_split permutes with `randperm(num_train, generator)` and hands out consecutive
    slices, so the second subset is the permutation's last v entries."""
    import torch

    if num_train < 0 or not 0.0 <= fraction <= 1.0 or (cap is not None and cap < 0):
        raise ValueError(f"bad validation split: num_train={num_train}, fraction={fraction}, "
                         f"cap={cap}")
    size = int(num_train * fraction)
    if cap is not None:
        size = min(size, cap)
    permutation = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return np.sort(permutation[num_train - size:].numpy()).astype(np.int64)
