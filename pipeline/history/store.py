"""The results history: every run's rows, as a parquet dataset partitioned by date.

Layout: `<root>/date=YYYY-MM-DD/<run_id>.parquet`, one file per run. A run never edits another
run's file, so concurrent runs cannot conflict, and each file is written under a hidden name
(`.<run_id>.<random>.tmp`) and then moved into place: pyarrow's dataset discovery skips names
starting with "." or "_", so a reader sees a run's rows entirely or not at all, and a writer
killed mid-write leaves only an ignored temporary file. On object stores the move is a
server-side copy, which also appears whole.

Reads pass an explicit schema: without it pyarrow infers the `date` partition as a date32 or,
for some values, an integer, and the history's columns would change type from one read to the
next.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import InputError, OutputError
from pipeline.io.output import fsync_path
from pipeline.io.storage import filesystem

ROW_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("git_commit", pa.string()),
    ("kind", pa.string()),            # merge | evaluate | sweep | bench
    ("method", pa.string()),          # a merge method, or zero_shot / finetuned reference rows
    ("params", pa.string()),          # the method's parameters, JSON with sorted keys
    ("suite", pa.string()),
    ("manifest_digest", pa.string()),  # sha256 of the task manifest: which data was measured
    ("model", pa.string()),           # base checkpoint (or suite model) it was run on
    ("model_params", pa.int64()),     # parameter count: merge time is read against it
    ("task", pa.string()),            # a task name, or "mean" for the mean over tasks
    ("num_tasks", pa.int32()),
    ("alpha", pa.float64()),
    ("split", pa.string()),
    ("accuracy", pa.float64()),
    ("normalized_accuracy", pa.float64()),
    ("merge_seconds", pa.float64()),
    ("eval_seconds", pa.float64()),
    ("peak_memory_bytes", pa.int64()),
    ("hardware", pa.string()),        # JSON: what the times were measured on
])
PARTITION = pa.schema([("date", pa.string())])
HISTORY_SCHEMA = pa.schema(list(ROW_SCHEMA) + list(PARTITION))
MEAN = "mean"


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs on any host."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:10]}"


def git_commit(repo_dir: str | None = None) -> str:
    """The code's commit. Ray's working_dir upload drops .git, so a job is told through
    MERGE_PIPELINE_GIT_COMMIT (the nightly manifests set it); "unknown" when neither works."""
    if os.environ.get("MERGE_PIPELINE_GIT_COMMIT"):
        return os.environ["MERGE_PIPELINE_GIT_COMMIT"]
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", repo_dir, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def hardware() -> str:
    """Times are only comparable on the same hardware; this string is part of that key."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                            "cpu": _cpu_model()}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i)
                            for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return json.dumps(info, sort_keys=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def params_json(params: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(params or {}), sort_keys=True)


def make_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows to the history's schema; an unknown or mistyped column is an error here, at the
    writer, not a surprise at the next night's read."""
    rows = list(rows)
    unknown = {k for r in rows for k in r} - set(ROW_SCHEMA.names)
    if unknown:
        raise InputError(f"history rows have unknown columns: {sorted(unknown)}")
    try:
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"history rows do not fit the schema: {exc}") from exc


def append_run(root: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """Write one run's rows as one new file; returns its path. All rows must share run_id."""
    table = make_table(rows)
    run_ids = set(table.column("run_id").to_pylist())
    if len(run_ids) != 1 or None in run_ids:
        raise InputError(f"one file holds one run: got run ids {sorted(map(str, run_ids))}")
    run_id = run_ids.pop()
    stamps = table.column("timestamp")
    if stamps.null_count:
        raise InputError("every history row needs a timestamp")
    date = min(stamps.to_pylist()).astimezone(dt.timezone.utc).strftime("%Y-%m-%d")
    fs, base = filesystem(root)
    directory = f"{base.rstrip('/')}/date={date}"
    final = f"{directory}/{run_id}.parquet"
    tmp = f"{directory}/.{run_id}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fs.create_dir(directory, recursive=True)
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            raise OutputError(f"{final}: run {run_id} is already in the history")
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(table, sink)
        local = isinstance(fs, pafs.LocalFileSystem)
        if local:
            fsync_path(tmp)
        fs.move(tmp, final)
        if local:
            fsync_path(directory)
    except OSError as exc:
        _remove_quietly(fs, tmp)
        raise OutputError(f"{final}: cannot append to the history ({exc})") from exc
    return final if "://" not in root else f"{root.rstrip('/')}/date={date}/{run_id}.parquet"


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.delete_file(path)


def read_history(root: str, filter: ds.Expression | None = None) -> pa.Table:
    """The whole history (or the rows matching `filter`), sorted by time; empty if none yet."""
    fs, base = filesystem(root)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return HISTORY_SCHEMA.empty_table()
    try:
        dataset = ds.dataset(base, filesystem=fs, format="parquet", schema=HISTORY_SCHEMA,
                             partitioning=ds.partitioning(PARTITION, flavor="hive"))
        table = dataset.to_table(filter=filter)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{root}: the results history cannot be read: {exc}") from exc
    return table.sort_by([("timestamp", "ascending"), ("run_id", "ascending")])
