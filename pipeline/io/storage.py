"""Byte-range access to local paths and object stores behind one small interface.

Workers read only their own tensors, so every read is a (offset, length) range. Local paths use
plain file objects (fastest, no extra copies); URIs with a scheme (s3://, gs://, hdfs://,
file://) go through `pyarrow.fs`, which gives ranged reads on every backend it supports.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Protocol

from pipeline.errors import InputError


class RangeReader(Protocol):
    size: int

    def read_range(self, offset: int, length: int) -> bytearray: ...

    def close(self) -> None: ...


# Schemes a user may write with a single slash or none ("s3:bucket/x"): still a URI, never a
# local folder named "s3:".
_KNOWN_SCHEMES = {"file", "s3", "s3a", "s3n", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss",
                  "az", "wasb", "wasbs", "http", "https", "ftp", "sftp", "mock"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def is_uri(location: str) -> bool:
    match = _SCHEME.match(location)
    return "://" in location or bool(match and match.group(1).lower() in _KNOWN_SCHEMES)


def local_path(location: str) -> str | None:
    """The local filesystem path a location names (a plain path or a `file:` URI), else None."""
    if not is_uri(location):
        return location
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme.lower() != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return urllib.parse.unquote(parsed.path) or "/"


def canonical(location: str) -> str:
    """One spelling per place, for comparing locations: a local path (plain, relative,
    `file://`, through symlinks, with a trailing slash) becomes its absolute real path; an
    object-store URI loses its trailing slash and the case of its scheme."""
    path = local_path(location)
    if path is not None:
        return os.path.realpath(path)
    parsed = urllib.parse.urlparse(location)
    return f"{parsed.scheme.lower()}://{parsed.netloc}{parsed.path.rstrip('/')}"


def contains(outer: str, inner: str) -> bool:
    """Whether canonical location `inner` is `outer` or lies below it."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def output_directory(location: str, option: str = "--out") -> str:
    """The absolute local directory an output location names. Outputs are local directories
    (or `file://` URIs) for now: anything else is refused before any input is read, never
    turned into a local folder called `s3:`."""
    path = local_path(location)
    if path is None:
        scheme = urllib.parse.urlparse(location).scheme or location.split(":")[0]
        raise InputError(f"{option} {location}: outputs must be a local directory or a "
                         f"file:// URI; writing to {scheme}:// is not supported yet")
    if not path.strip():
        raise InputError(f"{option} is empty")
    return os.path.abspath(path)


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_uri(location) else os.path.join(location, name)


def _arrow_fs(location: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises several types for bad URIs
        raise InputError(f"{location}: cannot open storage: {exc}") from exc


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs as pafs

    fs, path = _arrow_fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    if not is_uri(location):
        return os.path.isdir(location)
    import pyarrow.fs as pafs

    fs, path = _arrow_fs(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(location: str) -> bytes:
    reader = open_range_reader(location)
    try:
        return bytes(reader.read_range(0, reader.size))
    finally:
        reader.close()


class _LocalReader:
    def __init__(self, path: str):
        try:
            self._file = open(path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise InputError(f"{path}: no such file") from exc
        except PermissionError as exc:
            raise InputError(f"{path}: not readable (permission denied)") from exc
        except IsADirectoryError as exc:
            raise InputError(f"{path}: is a directory, expected a file") from exc
        self.path = path
        self.size = os.fstat(self._file.fileno()).st_size

    def read_range(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if n == 0:
                raise InputError(f"{self.path}: file ended at byte {offset + got}, "
                                 f"expected {offset + length} (truncated?)")
            got += n
        return buf

    def close(self) -> None:
        self._file.close()


class _ArrowReader:
    def __init__(self, location: str):
        fs, path = _arrow_fs(location)
        try:
            self._file = fs.open_input_file(path)
        except FileNotFoundError as exc:
            raise InputError(f"{location}: no such file") from exc
        except OSError as exc:
            raise InputError(f"{location}: cannot open: {exc}") from exc
        self.path = location
        self.size = self._file.size()

    def read_range(self, offset: int, length: int) -> bytearray:
        data = self._file.read_at(length, offset)
        if len(data) != length:
            raise InputError(f"{self.path}: file ended at byte {offset + len(data)}, "
                             f"expected {offset + length} (truncated?)")
        return bytearray(data)

    def close(self) -> None:
        self._file.close()


def open_range_reader(location: str) -> RangeReader:
    return _ArrowReader(location) if is_uri(location) else _LocalReader(location)
