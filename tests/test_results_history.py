"""The results history: appends from many runs, at once or killed half-way, stay readable."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.errors import InputError, OutputError
from pipeline.history.store import (HISTORY_SCHEMA, MEAN, append_run, make_table, new_run_id,
                              read_history)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rows(run_id: str, when: dt.datetime, method: str = "iso_cts", accuracy: float = 0.5,
             tasks: int = 2) -> list[dict]:
    rows = [{"run_id": run_id, "timestamp": when, "kind": "bench", "method": method,
             "suite": "tiny", "task": f"task{i}", "num_tasks": tasks, "accuracy": accuracy,
             "normalized_accuracy": accuracy / 0.8, "merge_seconds": 1.5,
             "peak_memory_bytes": 2**31, "params": "{}", "hardware": "{}"}
            for i in range(tasks)]
    rows.append({**rows[0], "task": MEAN})
    return rows


NOW = dt.datetime(2026, 11, 20, 3, 0, tzinfo=dt.timezone.utc)


def test_two_runs_append_and_read_back_with_their_types(tmp_path):
    root = str(tmp_path / "history")
    first = append_run(root, run_rows("run-a", NOW))
    second = append_run(root, run_rows("run-b", NOW + dt.timedelta(days=1), accuracy=0.6))
    assert first.endswith("date=2026-11-20/run-a.parquet")
    assert second.endswith("date=2026-11-21/run-b.parquet")
    table = read_history(root)
    assert table.schema == HISTORY_SCHEMA
    assert table.num_rows == 6
    # The partition stays a string (inference would make it a date or an integer).
    assert table.column("date").to_pylist() == ["2026-11-20"] * 3 + ["2026-11-21"] * 3
    assert table.column("num_tasks").type == pa.int32()
    assert table.column("run_id").to_pylist()[::3] == ["run-a", "run-b"]
    latest = read_history(root, filter=ds.field("date") == "2026-11-21")
    assert set(latest.column("run_id").to_pylist()) == {"run-b"}


def test_an_empty_or_missing_history_reads_as_empty(tmp_path):
    assert read_history(str(tmp_path / "none")).num_rows == 0


def test_uri_roots_work_through_pyarrow_fs(tmp_path):
    root = f"file://{tmp_path}/history"
    path = append_run(root, run_rows("run-uri", NOW))
    assert path.startswith("file://") and os.path.exists(path[len("file://"):])
    assert read_history(root).num_rows == 3


def test_one_file_holds_exactly_one_run_and_rows_must_fit_the_schema(tmp_path):
    root = str(tmp_path / "history")
    with pytest.raises(InputError, match="one run"):
        append_run(root, run_rows("a", NOW) + run_rows("b", NOW))
    with pytest.raises(InputError, match="unknown columns"):
        append_run(root, [{**run_rows("a", NOW)[0], "acuracy": 0.5}])
    with pytest.raises(InputError, match="schema"):
        append_run(root, [{**run_rows("a", NOW)[0], "num_tasks": "two"}])
    append_run(root, run_rows("a", NOW))
    with pytest.raises(OutputError, match="already in the history"):
        append_run(root, run_rows("a", NOW))
    assert read_history(root).num_rows == 3


def _append_worker(root: str, index: int) -> None:
    append_run(root, run_rows(new_run_id(), NOW, accuracy=index / 100))


def test_concurrent_appends_all_land(tmp_path):
    root = str(tmp_path / "history")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(root, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = read_history(root)
    assert table.num_rows == 8 * 3
    assert len(set(table.column("run_id").to_pylist())) == 8
    assert sorted({round(a * 100) for a in table.column("accuracy").to_pylist()}) == list(range(8))


def test_a_writer_killed_mid_write_leaves_the_history_readable(tmp_path):
    root = str(tmp_path / "history")
    append_run(root, run_rows("before", NOW))
    # The child writes part of its file, then dies by SIGKILL before the file is complete.
    script = textwrap.dedent(f"""
        import datetime as dt, os, signal, sys
        sys.path.insert(0, {REPO!r})
        import pyarrow.parquet as pq
        from pipeline.history import store as results
        def dying_write(table, sink, **kw):
            sink.write(b"PAR1" + b"x" * 4096)
            sink.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        results.pq.write_table = dying_write
        when = dt.datetime(2026, 11, 20, 4, tzinfo=dt.timezone.utc)
        results.append_run({root!r}, [dict(run_id="killed", timestamp=when, kind="bench",
                                           task="mean", accuracy=0.1)])
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    leftovers = os.listdir(tmp_path / "history" / "date=2026-11-20")
    assert any(name.startswith(".killed.") for name in leftovers)  # the partial file exists ...
    table = read_history(root)  # ... and is not read
    assert set(table.column("run_id").to_pylist()) == {"before"}
    append_run(root, run_rows("after", NOW + dt.timedelta(hours=2)))
    assert set(read_history(root).column("run_id").to_pylist()) == {"before", "after"}


def test_a_corrupt_visible_file_is_a_clear_error(tmp_path):
    root = tmp_path / "history"
    append_run(str(root), run_rows("good", NOW))
    (root / "date=2026-11-20" / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot be read"):
        read_history(str(root))


def test_make_table_keeps_missing_columns_null():
    table = make_table([{"run_id": "r", "timestamp": NOW, "kind": "merge", "method": "ties"}])
    assert table.column("accuracy").to_pylist() == [None]
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
