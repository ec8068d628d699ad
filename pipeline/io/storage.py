"""Byte-range access to local paths and object stores behind one small interface.

Workers read only their own tensors, so every read is a (offset, length) range. Local paths use
plain file objects (fastest, no extra copies); URIs with a scheme (s3://, gs://, hdfs://,
file://) go through `pyarrow.fs`, which gives ranged reads on every backend it supports.

Writes go through `open_output`, the one way a file is produced: a local file is written under a
temporary name, fsynced and renamed; an object is streamed (multipart where the store needs it)
and exists only once its upload completes. Either way a reader sees a whole file or none.
`file://` URIs are local paths in every function here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

from pipeline.errors import InputError, StorageError


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


def is_local(location: str) -> bool:
    return local_path(location) is not None


def output_location(location: str, option: str = "--out") -> str:
    """Where an output goes, in one spelling: the absolute real path of a local directory (or
    `file://` URI), or an object-store URI without its trailing slash. A URI must name a prefix
    inside a bucket (the staging prefix lives beside it) and carry no query string (configure
    the store through its environment: AWS_ENDPOINT_URL, credentials), and its store must be
    one pyarrow can open; otherwise one line before any input is read, and never a local
    folder called `s3:`."""
    path = local_path(location)
    if path is not None:
        if not path.strip():
            raise InputError(f"{option} is empty")
        return os.path.realpath(os.path.abspath(path))
    parsed = urllib.parse.urlparse(location)
    if not parsed.netloc or parsed.netloc.startswith(":") or "://" not in location:
        raise InputError(f"{option} {location}: not a valid URI; write scheme://bucket/prefix")
    if parsed.query or parsed.fragment:
        raise InputError(f"{option} {location}: query parameters are not supported in an "
                         f"output URI; configure the store through its environment instead "
                         f"(e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)")
    if not parsed.path.strip("/"):
        raise InputError(f"{option} {location}: name a prefix inside the bucket, e.g. "
                         f"{location.rstrip('/')}/merged")
    uri = canonical(location)
    try:
        filesystem(uri)  # an unknown scheme or a store pyarrow cannot open fails here
    except InputError as exc:
        raise InputError(f"{option} {exc}") from None
    return uri


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_uri(location) else os.path.join(location, name)


def parent_and_name(location: str) -> tuple[str, str]:
    """(the directory or prefix holding `location`, its last component)."""
    if is_local(location):
        return os.path.split(location)
    head, _, name = location.rstrip("/").rpartition("/")
    return head, name


def filesystem(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a location and the path inside it (local paths included)."""
    import pyarrow.fs as pafs

    path = local_path(location)
    if path is not None:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises several types for bad URIs
        detail = " ".join(str(exc).split())  # pyarrow's messages can span lines
        raise InputError(f"{location}: cannot open storage: {detail}") from None



def _info(location: str, listing: bool = False, recursive: bool = False) -> tuple[Any, str]:
    """pyarrow's metadata of a URI (one entry, or a listing) and the path inside its store. A
    store that cannot be reached (endpoint, credentials, network) is a `StorageError`: one line
    for the user, and still an OSError for code that keeps staging or retries on one."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(location)
    try:
        if listing:
            selector = pafs.FileSelector(inner, recursive=recursive, allow_not_found=True)
            return fs.get_file_info(selector), inner
        return fs.get_file_info(inner), inner
    except OSError as exc:
        raise StorageError(f"{location}: cannot reach its storage "
                           f"({' '.join(str(exc).split())})") from None


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs as pafs

    return _info(location)[0].type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    if not is_uri(location):
        return os.path.isdir(location)
    import pyarrow.fs as pafs

    return _info(location)[0].type == pafs.FileType.Directory


def size_of(location: str) -> int | None:
    """A file's size in bytes, or None when there is no file there."""
    path = local_path(location)
    if path is not None:
        return os.path.getsize(path) if os.path.isfile(path) else None
    import pyarrow.fs as pafs

    info = _info(location)[0]
    return info.size if info.type == pafs.FileType.File else None


def list_names(location: str) -> list[str]:
    """Names directly under a directory or prefix (files and subdirectories); [] if none."""
    path = local_path(location)
    if path is not None:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    return sorted(info.base_name for info in _info(location, listing=True)[0])


def list_files(location: str) -> list[str]:
    """Every file under a directory or prefix, as sorted '/'-separated relative paths."""
    path = local_path(location)
    if path is not None:
        found = [os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
                 for d, _, files in os.walk(path) for f in files]
        return sorted(found)
    import pyarrow.fs as pafs

    infos, inner = _info(location, listing=True, recursive=True)
    return sorted(i.path[len(inner.rstrip("/")) + 1:] for i in infos
                  if i.type == pafs.FileType.File)


def copy_tree(source: str, destination: str) -> None:
    """Copy every file under `source` to the same relative path under `destination`, across
    stores (local to object store and back), streaming."""
    for relative in list_files(source):
        target = join(destination, relative)
        if is_local(target):
            os.makedirs(os.path.dirname(str(local_path(target))), exist_ok=True)
        reader = open_range_reader(join(source, relative))
        try:
            with open_output(target) as out:
                for offset in range(0, reader.size, 16 << 20):
                    out.write(reader.read_range(offset, min(16 << 20, reader.size - offset)))
        finally:
            reader.close()


def make_dirs(location: str) -> None:
    path = local_path(location)
    if path is not None:
        os.makedirs(path, exist_ok=True)
    else:
        fs, inner = filesystem(location)
        fs.create_dir(inner, recursive=True)


def remove(location: str) -> None:
    """Delete a file; one that is already gone is fine."""
    path = local_path(location)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, inner = filesystem(location)
    if size_of(location) is not None:
        fs.delete_file(inner)


def remove_tree(location: str) -> None:
    """Delete a directory or prefix and everything under it; a missing one is fine."""
    path = local_path(location)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(inner)


def copy_file(source: str, destination: str) -> None:
    """Copy within one store: a server-side copy on object stores, no bytes through us."""
    fs, inner = filesystem(source)
    fs.copy_file(inner, filesystem(destination)[1])


@contextlib.contextmanager
def open_output(location: str) -> Iterator[BinaryIO]:
    """A binary stream whose file appears at `location` only when the block ends without an
    error: local files are written under a temporary name, fsynced and renamed into place;
    objects are uploaded by pyarrow (multipart when large) and exist once the upload
    completes. On an error nothing is left at `location` (pyarrow cannot abort an upload, so
    the object it completes on close is deleted). Raises OSError."""
    path = local_path(location)
    if path is not None:
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    fs, inner = filesystem(location)
    stream = fs.open_output_stream(inner)
    try:
        yield stream
    except BaseException:
        with contextlib.suppress(OSError):
            stream.close()
            fs.delete_file(inner)
        raise
    stream.close()


def write_bytes(location: str, data: bytes) -> None:
    with open_output(location) as out:
        out.write(data)


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
        fs, path = filesystem(location)
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
