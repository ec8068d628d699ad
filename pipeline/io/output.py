"""Atomic output directories.

Everything is written into a hidden sibling directory (same filesystem, so the final rename is
atomic) and renamed into place only when complete. A reader therefore sees either no output or a
whole one; a crash leaves only the staging directory, whose name says what it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from pipeline.errors import InputError, OutputConflictError, OutputError
from pipeline.io.storage import canonical, contains, output_directory, read_bytes

STAGING_MARK = ".merge-staging-"


def staging_dir_for(final: str, run_key: str | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}{STAGING_MARK}{run_key or uuid.uuid4().hex[:12]}")


REPORT_NAME = "merge_report.json"


def prepare_output(location: str, overwrite: bool, inputs: Sequence[str] = (),
                   option: str = "--out") -> str:
    """Check everything about an output that needs no input bytes, and return its directory.

    Runs before the first tensor byte is read, so a wrong `--out` costs milliseconds, not a
    ViT-L scan: the location must be local; it must not overlap any input, however either is
    spelled; an existing output is replaced only with `overwrite` and only when it is ours or
    empty; and the directory it will be created in must be writable.
    """
    final = os.path.realpath(output_directory(location, option))
    for source in inputs:
        where = canonical(source)
        if contains(final, where) or contains(where, final):
            raise InputError(f"{option} {location}: overlaps the input {source}; choose "
                             f"another output directory")
    if os.path.lexists(final):
        if not overwrite:
            raise InputError(f"{option} {location}: already exists (pass --overwrite to replace "
                             f"a previous output of merge-pipeline)")
        refuse_to_replace(final, location)
    _check_writable(_existing_ancestor(os.path.dirname(final)), location)
    return final


def refuse_to_replace(final: str, location: str) -> None:
    """--overwrite replaces only what cannot be the user's own data: a previous output of this
    tool (it holds a merge_report.json) or an empty directory."""
    if not os.path.isdir(final):
        raise InputError(f"{location}: exists and is not a directory; --overwrite replaces "
                         f"only a previous output or an empty directory")
    entries = os.listdir(final)
    if entries and not os.path.isfile(os.path.join(final, REPORT_NAME)):
        raise InputError(f"{location}: not an output of merge-pipeline (no {REPORT_NAME}) and "
                         f"not empty; --overwrite replaces only a previous output or an empty "
                         f"directory, so nothing was touched")


def check_free_space(location: str, needed: int) -> None:
    """Refuse an output its filesystem has no room for, before any compute."""
    final = os.path.realpath(output_directory(location))
    free = shutil.disk_usage(_existing_ancestor(os.path.dirname(final))).free
    if free < needed:
        raise OutputError(f"{location}: the output needs {needed} bytes but only {free} are "
                          f"free on its filesystem")


def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(directory: str, location: str) -> None:
    if not os.path.isdir(directory):
        raise InputError(f"{location}: cannot be created: {directory} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".merge-pipeline-probe-", dir=directory))
    except OSError as exc:
        raise InputError(f"{location}: cannot be created: {directory} is not writable "
                         f"({exc.strerror or exc})") from None


class StagedOutput:
    """A directory that appears at `final` only on `commit()`.

    With a `run_key` (a digest of everything that determines the output) the staging name is
    stable, so an interrupted run's work can be found again: `resume=True` keeps it, otherwise
    it is recognised as stale and removed. On an interruption or a crash the staging directory
    is kept for `--resume`; on bad input or a failed write it is removed (nothing to resume,
    and a full disk needs its space back).

    The commit re-checks the destination under a lock on its parent directory: an output that
    appeared while this run worked (another merge to the same `--out`) is never replaced
    without `overwrite`, and then only if it is ours or empty.
    """

    def __init__(self, final: str, overwrite: bool = False, run_key: str | None = None,
                 resume: bool = False):
        self.location = final
        self.final = prepare_output(final, overwrite)
        self.overwrite = overwrite
        self.path = staging_dir_for(self.final, run_key)
        self.resumed = resume and os.path.isdir(self.path)
        self.keep_staging = False
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

    def write_text(self, name: str, text: str) -> None:
        write_file_atomic(self.file(name), lambda f: f.write(text.encode()))

    def copy_in(self, location: str, name: str) -> None:
        """Copy a small file (a base's config.json) from a local path or URI into the output."""
        with open(self.file(name), "wb") as f:
            f.write(read_bytes(location))

    def commit(self) -> str:
        parent = os.path.dirname(self.final)
        old = None
        with _locked_directory(parent):
            if os.path.lexists(self.final):
                self._check_still_replaceable()  # keeps the resume markers when it refuses
            for name in os.listdir(self.path):
                if name == ".lock" or name.endswith(DONE_SUFFIX):
                    os.remove(os.path.join(self.path, name))
            fsync_path(self.path)
            if os.path.lexists(self.final):
                old = staging_dir_for(self.final) + ".old"
                os.rename(self.final, old)
            try:
                os.rename(self.path, self.final)
            except OSError as exc:  # a non-empty directory appeared outside our lock
                self.keep_staging = True
                raise OutputConflictError(f"{self.location}: could not be put in place ({exc}); "
                                          f"this merge's files are kept in {self.path}") from None
            fsync_path(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.final

    def _check_still_replaceable(self) -> None:
        """The destination exists at commit time: it may have appeared while this run worked."""
        try:
            if not self.overwrite:
                raise InputError(f"{self.location}: an output appeared there while this merge "
                                 f"ran and was not replaced (pass --overwrite to replace it)")
            refuse_to_replace(self.final, self.location)
        except InputError as exc:
            self.keep_staging = True
            raise OutputConflictError(f"{exc}; this merge's files are kept in {self.path}: the "
                                      f"same command with --resume commits them without "
                                      f"recomputing") from None

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.committed or self.keep_staging:
            return
        if issubclass(exc_type, (InputError, OutputError)):
            self.abort()
        elif exc is not None:
            # Interrupted or crashed: the finished files stay for --resume. main() tells the
            # user where, in its one line, whatever stopped the run.
            with contextlib.suppress(AttributeError):
                exc.staging_dir = self.path


DONE_SUFFIX = ".done.json"


def done_marker(directory: str, file_name: str) -> str:
    """Written beside a finished output file: its manifest, checked again on --resume."""
    return os.path.join(directory, f".{file_name}{DONE_SUFFIX}")


def write_file_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
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


@contextlib.contextmanager
def _locked_directory(directory: str) -> Iterator[None]:
    """An exclusive advisory lock on a directory itself (flock on its descriptor): commits to
    the same parent are serialised, and nothing is left behind to clean up."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
