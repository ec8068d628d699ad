"""Atomic output directories.

Everything is written into a hidden sibling directory (same filesystem, so the final rename is
atomic) and renamed into place only when complete. A reader therefore sees either no output or a
whole one; a crash leaves only the staging directory, whose name says what it is.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import uuid
from typing import Any, BinaryIO, Callable

from ..errors import InputError, OutputError
from .storage import read_bytes

STAGING_MARK = ".merge-staging-"


def staging_dir_for(final: str, run_key: str | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}{STAGING_MARK}{run_key or uuid.uuid4().hex[:12]}")


class StagedOutput:
    """A directory that appears at `final` only on `commit()`.

    With a `run_key` (a digest of everything that determines the output) the staging name is
    stable, so an interrupted run's work can be found again: `resume=True` keeps it, otherwise
    it is recognised as stale and removed. On an interruption or a crash the staging directory
    is kept for `--resume`; on bad input or a failed write it is removed (nothing to resume,
    and a full disk needs its space back).
    """

    def __init__(self, final: str, overwrite: bool = False, run_key: str | None = None,
                 resume: bool = False):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and not overwrite:
            raise InputError(f"{final}: output already exists (pass --overwrite to replace it)")
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise InputError(f"{final}: exists and is not a directory")
        self.path = staging_dir_for(self.final, run_key)
        self.resumed = resume and os.path.isdir(self.path)
        try:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            if os.path.isdir(self.path) and not resume:
                self._lock()  # refuse to delete a directory another run is writing
                shutil.rmtree(self.path)
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{final}: cannot create the output directory ({exc})") from exc
        self._lock()
        self._remove_stale_siblings()
        self.committed = False

    def _lock(self) -> None:
        self._lock_file = _try_lock(self.path)
        if self._lock_file is None:
            raise InputError(f"{self.final}: another merge is writing this output right now "
                             f"({self.path})")

    def _remove_stale_siblings(self) -> None:
        """Staging directories of this output from other, dead runs (other options or inputs):
        they can never be resumed by this merge, so they only hold disk space."""
        parent, name = os.path.split(self.final)
        prefix = f".{name}{STAGING_MARK}"
        for entry in os.listdir(parent):
            path = os.path.join(parent, entry)
            if entry.startswith(prefix) and path != self.path and os.path.isdir(path):
                lock = _try_lock(path)
                if lock is not None:  # no live run holds it
                    shutil.rmtree(path, ignore_errors=True)
                    lock.close()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)

    def copy_in(self, location: str, name: str) -> None:
        """Copy a small file (a base's config.json) from a local path or URI into the output."""
        with open(self.file(name), "wb") as f:
            f.write(read_bytes(location))

    def commit(self) -> str:
        for name in os.listdir(self.path):
            if name == ".lock" or name.endswith(DONE_SUFFIX):
                os.remove(os.path.join(self.path, name))
        fsync_path(self.path)
        old = None
        if os.path.exists(self.final):
            old = staging_dir_for(self.final) + ".old"
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        fsync_path(os.path.dirname(self.final))
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.final

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.committed:
            return
        if issubclass(exc_type, (InputError, OutputError)):
            self.abort()
        else:
            sys.stderr.write(f"merge interrupted: finished files kept in {self.path}; "
                             f"run the same command with --resume to reuse them\n")


DONE_SUFFIX = ".done.json"


def done_marker(directory: str, file_name: str) -> str:
    """Written beside a finished output file: its manifest, checked again on --resume."""
    return os.path.join(directory, f".{file_name}{DONE_SUFFIX}")


def write_file_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a small file through `write(fh)` under a temporary name, fsync it, rename it into
    place: a reader sees the old file or the whole new one, never part of it."""
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"{path}: write failed ({exc})") from exc


def write_json_atomic(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode()))


def _try_lock(directory: str):
    """An exclusive lock on `directory`/.lock, or None when a live process holds it."""
    handle = open(os.path.join(directory, ".lock"), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        handle.close()
        return None


def fsync_path(path: str) -> None:
    """Flush a file's data, or a directory's entries (so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
