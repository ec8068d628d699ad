"""The safetensors format, read by byte range and written as a stream.

We parse the header ourselves instead of calling `safe_open` because workers must read single
tensors from object stores (no mmap there) and because a corrupt or truncated file must become a
clear `CorruptFileError` naming the file, never a crash inside a native library. The writer
streams tensors in a planned order and hashes while it writes, so a worker never holds a whole
file and the manifest gets its checksum for free. Files appear only when whole
(`storage.open_output`), on local disks and object stores alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch

from pipeline.errors import CorruptFileError, OutputError
from pipeline.io.storage import RangeReader, open_output, open_range_reader

# Same bound as the reference implementation: a header beyond this is not a real checkpoint.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# The floating dtypes a merge reads and writes (fp8 is stored, never merged).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file (offsets are absolute in the file)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def parse_header(raw_len: bytes | bytearray, read_header, file_size: int, name: str
                 ) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate a header completely; any lie about offsets, sizes or dtypes is an error."""
    if file_size < 8 or len(raw_len) < 8:
        raise CorruptFileError(f"{name}: {file_size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", raw_len[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CorruptFileError(f"{name}: header length {header_len} exceeds the "
                               f"{MAX_HEADER_BYTES}-byte limit (not safetensors, or corrupt)")
    if 8 + header_len > file_size:
        raise CorruptFileError(f"{name}: header length {header_len} runs past the end of the "
                               f"{file_size}-byte file (truncated?)")
    try:
        header = json.loads(bytes(read_header(header_len)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{name}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptFileError(f"{name}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        entries[key] = _parse_entry(key, info, data_start, name)
    spans = sorted((e.start - data_start, e.end - data_start, k) for k, e in entries.items())
    cursor = 0
    for begin, end, key in spans:
        if begin != cursor:
            what = "overlaps another tensor" if begin < cursor else "leaves a gap before it"
            raise CorruptFileError(f"{name}: tensor {key!r} {what} (offset {begin}, "
                                   f"expected {cursor})")
        cursor = end
    if cursor > data_len:
        raise CorruptFileError(f"{name}: header says the data ends at byte {data_start + cursor} "
                               f"but the file has {file_size} bytes (truncated?)")
    if cursor < data_len:
        raise CorruptFileError(f"{name}: {data_len - cursor} bytes after the last tensor "
                               f"(corrupt or not safetensors)")
    return entries, metadata


def _parse_entry(key: str, info, data_start: int, name: str) -> TensorEntry:
    if not isinstance(info, dict):
        raise CorruptFileError(f"{name}: entry {key!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise CorruptFileError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptFileError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CorruptFileError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * dtype_size(dtype)
    if offsets[1] - offsets[0] != expected:
        raise CorruptFileError(f"{name}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes "
                               f"but {dtype}{shape} needs {expected}")
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """One safetensors file opened for ranged reads; the header is parsed once, eagerly."""

    def __init__(self, location: str):
        self.location = location
        self._reader: RangeReader = open_range_reader(location)
        raw: list[bytes] = []

        def read_header(n: int) -> bytes:
            raw.append(bytes(self._reader.read_range(8, n)))
            return raw[-1]

        try:
            size = self._reader.size
            head = self._reader.read_range(0, min(8, size)) if size else b""
            self.entries, self.metadata = parse_header(head, read_header, size, location)
        except BaseException:
            self._reader.close()
            raise
        self.size = size
        # The 8-byte length and the JSON header as stored: with each tensor's sha256 they
        # identify the file's content without hashing its data twice (`io.scan.file_digest`).
        self.header_bytes = bytes(head[:8]) + raw[0]

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        buf = self._reader.read_range(entry.start, entry.nbytes)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def build_header(layout: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str]) -> bytes:
    """Header bytes for tensors stored in `layout` order; padded to 8 bytes like the reference."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape in layout:
        n = math.prod(shape) * dtype_size(dtype)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> WrittenFile:
    """Write `tensors` (in sorted key order) to `path` atomically and return its digest."""
    keys = sorted(tensors)
    layout = [(k, DTYPE_NAMES[tensors[k].dtype], tuple(tensors[k].shape)) for k in keys]
    return write_stream(path, layout, ((k, tensors[k]) for k in keys),
                        {"format": "pt", **(metadata or {})})


def write_stream(path: str, layout: Sequence[tuple[str, str, Sequence[int]]],
                 tensors: Iterable[tuple[str, torch.Tensor]],
                 metadata: Mapping[str, str]) -> WrittenFile:
    """Stream tensors into `path` (a local path or an object-store URI), appearing there only
    when whole (`storage.open_output`).

    `tensors` must yield exactly the keys of `layout`, in that order, with matching dtypes and
    shapes: the header is written first, so anything else would make the file lie.
    """
    def checked() -> Iterator[memoryview]:
        expected = iter(layout)
        for key, tensor in tensors:
            want_key, want_dtype, want_shape = next(expected)
            got = (key, DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape))
            if got != (want_key, want_dtype, tuple(want_shape)):
                raise ValueError(f"{path}: writer got {got}, planned "
                                 f"{(want_key, want_dtype, tuple(want_shape))}")
            yield tensor_bytes(tensor)
        if next(expected, None) is not None:
            raise ValueError(f"{path}: writer got fewer tensors than planned")

    return write_tensor_bytes(path, layout, checked(), metadata)


def write_tensor_bytes(path: str, layout: Sequence[tuple[str, str, Sequence[int]]],
                       chunks: Iterable[Any], metadata: Mapping[str, str]) -> WrittenFile:
    """Write a safetensors file from each tensor's raw bytes (buffers in `layout` order, as a
    driver assembling workers' results has them), hashing while it writes. Each buffer must
    have its planned size, or nothing is written."""
    header = build_header(layout, metadata)
    sizes = [math.prod(s) * dtype_size(d) for _, d, s in layout]
    total = len(header) + sum(sizes)
    digest = hashlib.sha256(header)
    try:
        with open_output(path) as out:
            out.write(header)
            for i, (planned, size, chunk) in enumerate(zip_longest(layout, sizes, chunks)):
                data = None if chunk is None else memoryview(chunk).cast("B")
                if planned is None or data is None or data.nbytes != size:
                    raise ValueError(f"{path}: tensor {i} came with "
                                     f"{None if data is None else data.nbytes} bytes, "
                                     f"planned {size}")
                digest.update(data)
                out.write(data)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc}); "
                          f"this file needs {total} bytes") from exc
    return WrittenFile(path.rstrip("/").rsplit("/", 1)[-1], total, digest.hexdigest())
