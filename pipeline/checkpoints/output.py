"""Atomic output directories.

Everything is written into a hidden sibling directory (same filesystem, so the final rename is
atomic) and renamed into place only when complete. A reader therefore sees either no output or a
whole one; a crash leaves only the staging directory, whose name says what it is.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

from ..errors import InputError, OutputError

STAGING_MARK = ".merge-staging-"


def staging_dir_for(final: str) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}{STAGING_MARK}{uuid.uuid4().hex[:12]}")


class StagedOutput:
    """A directory that appears at `final` only on `commit()`; `abort()` removes every trace."""

    def __init__(self, final: str, overwrite: bool = False):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and not overwrite:
            raise InputError(f"{final}: output already exists (pass --overwrite to replace it)")
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise InputError(f"{final}: exists and is not a directory")
        parent = os.path.dirname(self.final)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = staging_dir_for(self.final)
            os.mkdir(self.path)
        except OSError as exc:
            raise OutputError(f"{final}: cannot create the output directory ({exc})") from exc
        self.committed = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.file(name), obj)

    def commit(self) -> str:
        _fsync_dir(self.path)
        old = None
        if os.path.exists(self.final):
            old = staging_dir_for(self.final) + ".old"
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        _fsync_dir(os.path.dirname(self.final))
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
        if exc_type is not None:
            self.abort()


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"{path}: write failed ({exc})") from exc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
