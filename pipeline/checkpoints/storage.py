"""Byte-range access to local paths and object stores behind one small interface.

Workers read only their own tensors, so every read is a (offset, length) range. Local paths use
plain file objects (fastest, no extra copies); URIs with a scheme (s3://, gs://, hdfs://,
file://) go through `pyarrow.fs`, which gives ranged reads on every backend it supports.
"""

from __future__ import annotations

import os
from typing import Protocol

from ..errors import InputError


class RangeReader(Protocol):
    size: int

    def read_range(self, offset: int, length: int) -> bytearray: ...

    def close(self) -> None: ...


def is_uri(location: str) -> bool:
    return "://" in location


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
