"""One lazy view over every checkpoint format we accept.

A `Checkpoint` knows every key's dtype and shape but reads tensor data only on `read(key)`, and
only from the one file that holds it. That is what lets a Ray worker merge one layer group of a
ViT-L without touching the rest: for a sharded Hugging Face directory it parses the headers of
the shard files its keys live in, nothing more.

Accepted layouts: a Hugging Face model directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`, or the same for `pytorch_model.bin`), a single `.safetensors`
file, and a torch state dict (`.pt`, `.pth`, `.bin`; loaded with `weights_only=True`), including
open_clip's `{"state_dict": ...}` wrapper and DDP's `module.` prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.errors import CorruptFileError, InputError
from pipeline.io import storage
from pipeline.io.output import COMMIT_MARK
from pipeline.io.safetensors_io import DTYPE_NAMES, FLOAT_DTYPES, SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Our own outputs besides models: merged task vectors and TSV-C artefacts.
INDEX_FILES = (SAFETENSORS_INDEX, TORCH_INDEX, "task_vector.safetensors.index.json",
               "tsv_c.safetensors.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin", "task_vector.safetensors", "tsv_c.safetensors")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class FileHeader:
    """What identifies one checkpoint file besides its tensors' bytes: its size, its header
    (a safetensors file's 8-byte length and JSON header as stored; for a torch file, which
    has none, the sorted (key, dtype, shape) list as JSON) and its keys in data order."""

    location: str
    size: int
    header: bytes
    keys: tuple[str, ...]


class Checkpoint:
    """Lazy key -> tensor view over one checkpoint (a file or a model directory)."""

    def __init__(self, location: str, key_to_file: dict[str, str] | None, files: list[str],
                 config_location: str | None):
        self.location = location
        self.files = files
        self.config_location = config_location
        self._key_to_file = key_to_file  # None: learn it from the headers
        self._open: dict[str, _FileHandle] = {}

    # -- metadata ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        if self._key_to_file is None:
            self._key_to_file = {k: f for f in self.files for k in self._handle(f).specs}
        return sorted(self._key_to_file)

    def spec(self, key: str) -> TensorSpec:
        file = self._file_of(key)
        try:
            return self._handle(file).specs[key]
        except KeyError:
            raise CorruptFileError(f"{file}: has no key {key!r}, but the index of "
                                   f"{self.location} says it does") from None

    def specs(self) -> dict[str, TensorSpec]:
        return {k: self.spec(k) for k in self.keys()}

    def file_headers(self) -> list[FileHeader]:
        """Each file's header, from the handles already open (no tensor data read)."""
        return [self._handle(f).header(f) for f in self.files]

    # -- data -------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        self.spec(key)  # a lying index is a clear error, not a KeyError
        return self._handle(self._file_of(key)).read(key)

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.location!r}, {len(self.files)} file(s))"

    # -- internals --------------------------------------------------------------------------
    def _file_of(self, key: str) -> str:
        if self._key_to_file is None:
            self.keys()
        try:
            return self._key_to_file[key]  # type: ignore[index]
        except KeyError:
            raise InputError(f"{self.location}: has no key {key!r}") from None

    def _handle(self, file: str) -> "_FileHandle":
        if file not in self._open:
            self._open[file] = _open_file(file)
        return self._open[file]


class _FileHandle(Protocol):
    specs: dict[str, TensorSpec]

    def read(self, key: str) -> torch.Tensor: ...

    def header(self, location: str) -> FileHeader: ...

    def close(self) -> None: ...


class _SafetensorsHandle:
    def __init__(self, location: str):
        self._file = SafetensorsFile(location)
        self.specs = {k: TensorSpec(e.dtype, e.shape) for k, e in self._file.entries.items()}

    def read(self, key: str) -> torch.Tensor:
        return self._file.read(key)

    def header(self, location: str) -> FileHeader:
        order = sorted(self._file.entries, key=lambda k: self._file.entries[k].start)
        return FileHeader(location, self._file.size, self._file.header_bytes, tuple(order))

    def close(self) -> None:
        self._file.close()


class _TorchHandle:
    def __init__(self, location: str):
        self._tensors = load_torch_state_dict(location)
        self.specs = {}
        for key, t in self._tensors.items():
            if t.dtype not in DTYPE_NAMES:
                raise InputError(f"{location}: tensor {key!r} has unsupported dtype {t.dtype}")
            self.specs[key] = TensorSpec(DTYPE_NAMES[t.dtype], tuple(t.shape))

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def header(self, location: str) -> FileHeader:
        keys = sorted(self.specs)
        listing = [[k, self.specs[k].dtype, list(self.specs[k].shape)] for k in keys]
        return FileHeader(location, storage.size_of(location) or 0,
                          json.dumps(listing, separators=(",", ":")).encode(), tuple(keys))

    def close(self) -> None:
        self._tensors = {}


def _open_file(location: str) -> _FileHandle:
    if location.endswith(".safetensors"):
        return _SafetensorsHandle(location)
    return _TorchHandle(location)


def load_torch_state_dict(location: str) -> dict[str, torch.Tensor]:
    """Load a torch checkpoint safely (`weights_only=True`), memory-mapped when local."""
    try:
        if storage.is_uri(location):
            import io
            obj = torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu",
                             weights_only=True)
        else:
            try:
                obj = torch.load(location, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(location, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{location}: no such file") from None
    except Exception as exc:  # pickle, zip and torch errors all mean: unreadable checkpoint
        raise CorruptFileError(f"{location}: not a readable torch checkpoint ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise InputError(f"{location}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(set(obj) - set(tensors))
    if others:
        raise InputError(f"{location}: entries that are not tensors: {others[:5]}")
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}  # saved from DDP
    return tensors


def open_checkpoint(location: str) -> Checkpoint:
    """Open any accepted checkpoint layout lazily; raises `InputError` naming the path."""
    location = str(location)
    if not storage.exists(location):
        raise InputError(f"{location}: does not exist")
    if not storage.is_dir(location):
        if not location.endswith((".safetensors",) + TORCH_SUFFIXES):
            raise InputError(f"{location}: unknown checkpoint format (expected .safetensors, "
                             f".pt, .pth, .bin or a model directory)")
        return Checkpoint(location, None, [location], None)
    if storage.exists(storage.join(location, COMMIT_MARK)):
        raise InputError(f"{location}: an output of merge-pipeline whose commit did not finish "
                         f"(it holds {COMMIT_MARK}); rerun its merge with --overwrite --resume")
    config_path = storage.join(location, "config.json")
    config = config_path if storage.exists(config_path) else None
    for index_name in INDEX_FILES:
        index_path = storage.join(location, index_name)
        if storage.exists(index_path):
            weight_map = _read_index(index_path)
            key_to_file = {k: storage.join(location, f) for k, f in weight_map.items()}
            files = sorted(set(key_to_file.values()))
            for f in files:
                if not storage.exists(f):
                    raise InputError(f"{index_path}: lists {f}, which does not exist")
            return Checkpoint(location, key_to_file, files, config)
    for name in SINGLE_FILES:
        path = storage.join(location, name)
        if storage.exists(path):
            return Checkpoint(location, None, [path], config)
    raise InputError(f"{location}: no model.safetensors, {SAFETENSORS_INDEX}, "
                     f"pytorch_model.bin or {TORCH_INDEX} in this directory")


def _read_index(index_path: str) -> dict[str, str]:
    try:
        index = json.loads(storage.read_bytes(index_path))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map keys to file names")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{index_path}: not a valid index ({exc})") from None
    for f in set(weight_map.values()):
        if "/" in f or "\\" in f or f.startswith("."):
            raise CorruptFileError(f"{index_path}: file name {f!r} points outside the directory")
    return weight_map

