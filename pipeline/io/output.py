"""Outputs that appear whole or not at all, on a local disk or an object store.

Everything is written under a hidden staging location beside the output, named after the run,
and put in place only when complete and verified. Locally that is one atomic rename of the
staging directory, under a lock on the parent directory. Object stores have no rename and no
directories, so there the commit is a protocol (`ObjectStoreOutput`): a commit marker first
(from then on every reader of ours treats the output as absent), the old output's report and
files removed, the staged files copied server-side into place and their sizes checked, the
report last, then the marker removed. A crash anywhere leaves either the old output, no
output, or a marked one whose staged files are still there for `--resume`.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

from pipeline.errors import InputError, OutputConflictError, OutputError
from pipeline.io.storage import (
    canonical,
    contains,
    copy_file,
    is_local,
    join,
    list_files,
    list_names,
    make_dirs,
    open_output,
    output_location,
    parent_and_name,
    read_bytes,
    remove,
    remove_tree,
    size_of,
    write_bytes,
)

STAGING_MARK = ".merge-staging-"
REPORT_NAME = "merge_report.json"
# On object stores: present while a commit is under way (or was cut short). An output holding
# it is absent to every reader of ours, whatever else it holds.
COMMIT_MARK = ".merge-pipeline-committing.json"
DONE_SUFFIX = ".done.json"
COPY_THREADS = 8  # concurrent server-side copies in an object-store commit

OutputState = Literal["absent", "empty", "ours", "uncommitted", "foreign", "file"]


def staging_dir_for(final: str, run_key: str | None = None) -> str:
    parent, name = parent_and_name(final)
    return join(parent, f".{name}{STAGING_MARK}{run_key or uuid.uuid4().hex[:12]}")


def probe_location(final: str) -> str:
    """A fresh name beside an output for a short-lived probe (never a staging name, so a
    concurrent run's clean-up leaves it alone)."""
    parent, name = parent_and_name(final)
    return join(parent, f".{name}.merge-probe-{uuid.uuid4().hex[:12]}")


def output_state(final: str) -> OutputState:
    """What is at an output location now: nothing, an empty directory, a committed output of
    ours, one whose commit was cut short, someone else's files, or a plain file."""
    if is_local(final):
        if not os.path.lexists(final):
            return "absent"
        if not os.path.isdir(final):
            return "file"
        names = os.listdir(final)
        if not names:
            return "empty"
    else:
        if size_of(final) is not None:
            return "file"
        names = list_names(final)
        if not names:
            return "absent"  # an object store has no empty directories
    if COMMIT_MARK in names:
        return "uncommitted"
    return "ours" if REPORT_NAME in names else "foreign"


def prepare_output(location: str, overwrite: bool, inputs: Sequence[str] = (),
                   option: str = "--out") -> str:
    """Check everything about an output that needs no input bytes, and return its location.

    Runs before the first tensor byte is read, so a wrong `--out` costs milliseconds, not a
    ViT-L scan: the location must be one we can write (a local directory or an object-store
    prefix); it must not overlap any input, however either is spelled; an existing output is
    replaced only with `overwrite` and only when it is ours or empty; and the place it will be
    created in must be writable.
    """
    final = output_location(location, option)
    for source in inputs:
        where = canonical(source)
        if contains(final, where) or contains(where, final):
            raise InputError(f"{option} {location}: overlaps the input {source}; choose "
                             f"another output directory")
    state = output_state(final)
    if state != "absent":
        if not overwrite:
            more = (" (a commit that did not finish: --overwrite --resume completes it)"
                    if state == "uncommitted" else "")
            raise InputError(f"{option} {location}: already exists{more} (pass --overwrite to "
                             f"replace a previous output of merge-pipeline)")
        refuse_to_replace(final, location, state)
    _check_writable(final, location)
    return final


def refuse_to_replace(final: str, location: str, state: OutputState | None = None) -> None:
    """--overwrite replaces only what cannot be the user's own data: a previous output of this
    tool (it holds a merge_report.json, or a commit marker) or an empty directory."""
    state = state or output_state(final)
    if state == "file":
        raise InputError(f"{location}: exists and is not a directory; --overwrite replaces "
                         f"only a previous output or an empty directory")
    if state == "foreign":
        raise InputError(f"{location}: not an output of merge-pipeline (no {REPORT_NAME}) and "
                         f"not empty; --overwrite replaces only a previous output or an empty "
                         f"directory, so nothing was touched")


def check_free_space(location: str, needed: int) -> None:
    """Refuse a local output its filesystem has no room for, before any compute (object
    stores have no such limit to check)."""
    final = output_location(location)
    if not is_local(final):
        return
    free = shutil.disk_usage(_existing_ancestor(os.path.dirname(final))).free
    if free < needed:
        raise OutputError(f"{location}: the output needs {needed} bytes but only {free} are "
                          f"free on its filesystem")


def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(final: str, location: str) -> None:
    """Prove the output can be created, by creating (and removing) a probe beside it."""
    if not is_local(final):
        probe = probe_location(final)
        try:
            write_bytes(probe, b"")
            remove(probe)
        except OSError as exc:
            raise InputError(f"{location}: cannot be written ({exc})") from None
        return
    directory = _existing_ancestor(os.path.dirname(final))
    if not os.path.isdir(directory):
        raise InputError(f"{location}: cannot be created: {directory} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".merge-pipeline-probe-", dir=directory))
    except OSError as exc:
        raise InputError(f"{location}: cannot be created: {directory} is not writable "
                         f"({exc.strerror or exc})") from None


def open_staged_output(location: str, overwrite: bool = False, run_key: str | None = None,
                       resume: bool = False, commit_point: str = REPORT_NAME) -> StagedOutput:
    """The staged output for a location: a local directory or an object-store prefix.
    `commit_point` names the file written last on an object store (our report)."""
    final = output_location(location)
    cls = LocalOutput if is_local(final) else ObjectStoreOutput
    return cls(location, overwrite, run_key, resume, commit_point)


class StagedOutput(abc.ABC):
    """An output that appears at its location only on `commit()`.

    With a `run_key` (a digest of everything that determines the output) the staging name is
    stable, so an interrupted run's work can be found again: `resume=True` keeps it, otherwise
    it is recognised as stale and removed. On an interruption or a crash the staging location
    is kept for `--resume`; on bad input or a failed write it is removed (nothing to resume,
    and a full disk needs its space back).

    The commit re-checks the destination: an output that appeared while this run worked
    (another merge to the same `--out`) is never replaced without `overwrite`, and then only if
    it is ours or empty.
    """

    def __init__(self, location: str, overwrite: bool = False, run_key: str | None = None,
                 resume: bool = False, commit_point: str = REPORT_NAME):
        self.location = location
        self.commit_point = commit_point
        self.final = prepare_output(location, overwrite)
        self.overwrite = overwrite
        self.path = staging_dir_for(self.final, run_key)
        self.keep_staging = False
        self.committed = False
        self.resumed = False

    def file(self, name: str) -> str:
        return join(self.path, name)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)

    def write_text(self, name: str, text: str) -> None:
        write_file_atomic(self.file(name), lambda f: f.write(text.encode()))

    def copy_in(self, location: str, name: str) -> None:
        """Copy a small file (a base's config.json) from a local path or URI into the output."""
        write_file_atomic(self.file(name), lambda f: f.write(read_bytes(location)))

    def staged_names(self) -> list[str]:
        """The output's top-level entries: what is staged, less our bookkeeping."""
        return [n for n in list_names(self.path) if not _is_bookkeeping(n)]

    @abc.abstractmethod
    def commit(self) -> str:
        """Put the staged files in place; returns the output's location."""

    def _check_still_replaceable(self, state: OutputState | None = None) -> None:
        """The destination exists at commit time: it may have appeared while this run worked."""
        try:
            if not self.overwrite:
                raise InputError(f"{self.location}: an output appeared there while this merge "
                                 f"ran and was not replaced (pass --overwrite to replace it)")
            refuse_to_replace(self.final, self.location, state)
        except InputError as exc:
            self.keep_staging = True
            raise OutputConflictError(f"{exc}; this merge's files are kept in {self.path}: the "
                                      f"same command with --resume commits them without "
                                      f"recomputing") from None

    def abort(self) -> None:
        if not self.committed:
            remove_tree(self.path)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.committed or self.keep_staging:
            return
        if issubclass(exc_type, (InputError, OutputError)):
            self.abort()
        elif exc is not None and not self._has_finished_files():
            self.abort()  # stopped before any file was finished: nothing to resume from
        elif exc is not None:
            # Interrupted or crashed: the finished files stay for --resume. main() tells the
            # user where, in its one line, whatever stopped the run.
            with contextlib.suppress(AttributeError):
                exc.staging_dir = self.path

    def _has_finished_files(self) -> bool:
        try:
            return bool(self.staged_names())
        except OSError:  # cannot tell (an unreachable store): keep it, never delete work
            return True


class LocalOutput(StagedOutput):
    """A local directory: staged in a hidden sibling (same filesystem, so the final rename is
    atomic), locked against a second run of the same merge, renamed into place."""

    def __init__(self, location: str, overwrite: bool = False, run_key: str | None = None,
                 resume: bool = False, commit_point: str = REPORT_NAME):
        super().__init__(location, overwrite, run_key, resume, commit_point)
        self.resumed = resume and os.path.isdir(self.path)
        try:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            if os.path.isdir(self.path) and not resume:
                self._lock()  # refuse to delete a directory another run is writing
                shutil.rmtree(self.path)
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{location}: cannot create the output directory ({exc})") from exc
        self._lock()
        self._remove_stale_siblings()

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

    def commit(self) -> str:
        parent = os.path.dirname(self.final)
        old = None
        with _locked_directory(parent):
            if os.path.lexists(self.final):
                self._check_still_replaceable()  # keeps the resume markers when it refuses
            keep = set(self.staged_names())
            for name in os.listdir(self.path):
                if name not in keep:
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


class ObjectStoreOutput(StagedOutput):
    """An object-store prefix (s3://, gs://, hdfs://...), committed by the protocol in this
    module's docstring. Stores have no locks: two runs of the *same* merge share a staging
    prefix and write identical bytes (the engine is deterministic); different merges stage
    apart, and the later commit finds the earlier output and replaces it only with
    `--overwrite`."""

    def __init__(self, location: str, overwrite: bool = False, run_key: str | None = None,
                 resume: bool = False, commit_point: str = REPORT_NAME):
        super().__init__(location, overwrite, run_key, resume, commit_point)
        try:
            staged = list_names(self.path)
            self.resumed = resume and bool(staged)
            if staged and not resume:
                remove_tree(self.path)
            make_dirs(self.path)
        except OSError as exc:
            raise OutputError(f"{location}: cannot create the staging prefix {self.path} "
                              f"({exc})") from exc

    def commit(self) -> str:
        state = output_state(self.final)
        if state != "absent":
            self._check_still_replaceable(state)
        names = [n for n in list_files(self.path) if not _is_bookkeeping(n.rsplit("/", 1)[-1])]
        last = self.commit_point
        if last not in names:
            raise OutputError(f"{self.path}: nothing to commit (no {last} staged)")
        mark = join(self.final, COMMIT_MARK)
        try:
            make_dirs(self.final)  # a no-op on object stores; HDFS has real directories
            write_json_atomic(mark, {"staging": self.path, "files": names,
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            remove(join(self.final, last))  # the old output's commit point goes first
            for name in list_files(self.final):
                if name not in (COMMIT_MARK, *names):
                    remove(join(self.final, name))
            # Server-side copies are requests that wait on the store: run them side by side,
            # then the commit point alone, last.
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                list(pool.map(self._place, [n for n in names if n != last]))
            self._place(last)
            remove(mark)
        except OSError as exc:
            self.keep_staging = True
            raise OutputError(f"{self.location}: commit failed ({exc}); the output is marked "
                              f"incomplete and this merge's files are kept in {self.path}: "
                              f"the same command with --overwrite --resume finishes "
                              f"it") from None
        remove_tree(self.path)
        self.committed = True
        return self.final

    def _place(self, name: str) -> None:
        """Copy one staged file into the output and check that all of it arrived."""
        copy_file(self.file(name), join(self.final, name))
        staged, placed = size_of(self.file(name)), size_of(join(self.final, name))
        if placed != staged:
            raise OSError(f"{name}: {placed} bytes after the copy, {staged} staged")


def _is_bookkeeping(name: str) -> bool:
    """Staged names that are ours, not the output's: locks, done-markers, and the temporary
    files of writers that died."""
    return name == ".lock" or name.endswith(DONE_SUFFIX) or ".partial-" in name


def done_marker(directory: str, file_name: str) -> str:
    """Written beside a finished output file: its manifest, checked again on --resume."""
    return join(directory, f".{file_name}{DONE_SUFFIX}")


def write_file_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write a small file (a path or an object URI) through `write(fh)`: a reader sees the old
    file or the whole new one, never part of it (`storage.open_output`)."""
    try:
        with open_output(path) as f:
            write(f)
    except OSError as exc:
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
