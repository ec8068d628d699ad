"""Outputs on an object store, against a real S3 server on 127.0.0.1 (moto, `s3_server`).

The commit protocol (io/output.py): files staged under a sibling prefix, a commit marker, the
old output's report and files removed, staged files copied into place, the report last, the
marker removed. Readers treat a marked or report-less prefix as no output."""

from __future__ import annotations

import os

import pytest
from conftest import output_bytes

from pipeline.cli.main import main
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import InputError, OutputError
from pipeline.io import open_checkpoint, storage
from pipeline.io.output import COMMIT_MARK, output_state
from pipeline.runtime.executors import LocalExecutor, RayExecutor

pytestmark = pytest.mark.slow


def config(example, out, method="iso_cts", **overrides) -> MergeConfig:
    base, tuned = example
    return MergeConfig(base=base, finetuned=list(tuned), method=method, alpha=1.0, out=out,
                       engine="local", **overrides)


def staging_prefixes(prefix: str) -> list[str]:
    parent, name = storage.parent_and_name(prefix)
    return [n for n in storage.list_names(parent) if n.startswith(f".{name}.merge-staging-")]


def test_merge_to_s3_gives_the_local_bytes_and_verifies(tiny_example, s3_prefix, tmp_path,
                                                        capsys):
    run_merge(config(tiny_example, str(tmp_path / "local")))
    code = main(["merge", "--engine", "local", "--base", tiny_example[0], "--finetuned",
                 *tiny_example[1], "--method", "iso_cts", "--alpha", "1", "--out", s3_prefix])
    assert code == 0, capsys.readouterr().err
    assert output_bytes(s3_prefix) == output_bytes(tmp_path / "local")
    assert output_state(s3_prefix) == "ours" and not staging_prefixes(s3_prefix)
    assert main(["verify", s3_prefix]) == 0
    with open_checkpoint(s3_prefix) as merged:  # our readers read it like a local output
        assert merged.keys()


def test_ray_workers_stream_their_files_to_the_store(tiny_example, s3_prefix, tmp_path,
                                                     ray_cluster):
    run_merge(config(tiny_example, str(tmp_path / "local"), max_shard_size="100KB"))
    report = run_merge(config(tiny_example, s3_prefix, max_shard_size="100KB"),
                       executor=RayExecutor(workers=2))
    assert report.engine.assembly == "workers"  # every node sees the store
    assert len(report.outputs) > 2
    assert output_bytes(s3_prefix) == output_bytes(tmp_path / "local")


def test_multipart_upload_and_ranged_reads(s3_prefix):
    data = os.urandom(3 << 20) * 8  # 24 MiB: pyarrow uploads it in several parts
    location = f"{s3_prefix}/big.bin"
    with storage.open_output(location) as out:
        for i in range(0, len(data), 5 << 20):
            out.write(data[i:i + (5 << 20)])
    assert storage.size_of(location) == len(data)
    reader = storage.open_range_reader(location)
    try:
        assert bytes(reader.read_range(17 << 20, 1000)) == data[17 << 20:(17 << 20) + 1000]
    finally:
        reader.close()


def test_a_failed_upload_leaves_no_object(s3_prefix):
    location = f"{s3_prefix}/half.bin"
    with pytest.raises(RuntimeError), storage.open_output(location) as out:
        out.write(b"x" * 1000)
        raise RuntimeError("writer died")
    assert storage.size_of(location) is None


def test_overwrite_rules_hold_on_the_store(tiny_example, s3_prefix):
    run_merge(config(tiny_example, s3_prefix, method="tsv_m"))
    with pytest.raises(InputError, match="already exists"):
        run_merge(config(tiny_example, s3_prefix))
    storage.write_bytes(f"{s3_prefix}/stale-from-an-old-run.safetensors", b"old")
    report = run_merge(config(tiny_example, s3_prefix, overwrite=True))
    assert report.method == "iso_cts"
    assert "stale-from-an-old-run.safetensors" not in storage.list_names(s3_prefix)
    assert main(["verify", s3_prefix]) == 0

    users = f"{s3_prefix}-users"
    storage.write_bytes(f"{users}/thesis.tex", b"precious")
    with pytest.raises(InputError, match="not an output of merge-pipeline"):
        run_merge(config(tiny_example, users, overwrite=True))
    assert storage.list_names(users) == ["thesis.tex"]
    assert storage.read_bytes(f"{users}/thesis.tex") == b"precious"


def test_an_interrupted_commit_is_no_output_until_resumed(tiny_example, s3_prefix,
                                                          monkeypatch):
    real_copy, copies = storage.copy_file, []

    def dying_copy(source, destination):
        if len(copies) == 1:
            raise OSError("connection reset")
        copies.append(destination)
        real_copy(source, destination)

    monkeypatch.setattr("pipeline.io.output.copy_file", dying_copy)
    with pytest.raises(OutputError, match="--overwrite --resume"):
        run_merge(config(tiny_example, s3_prefix))
    monkeypatch.undo()
    assert output_state(s3_prefix) == "uncommitted"
    assert COMMIT_MARK in storage.list_names(s3_prefix)
    assert main(["verify", s3_prefix]) == 1  # not an output, whatever it holds
    with pytest.raises(InputError, match="commit did not finish"):
        open_checkpoint(s3_prefix)
    with pytest.raises(InputError, match="already exists"):
        run_merge(config(tiny_example, s3_prefix))
    report = run_merge(config(tiny_example, s3_prefix, overwrite=True, resume=True))
    assert sorted(report.resumed_files) == sorted(f.name for f in report.outputs)  # no recompute
    assert output_state(s3_prefix) == "ours" and main(["verify", s3_prefix]) == 0
    assert not staging_prefixes(s3_prefix)


def test_an_interrupted_merge_resumes_from_the_staging_prefix(tiny_example, s3_prefix):
    class StopAfterOne(LocalExecutor):
        def imap(self, fn, calls, desc=""):
            for i, result in super().imap(fn, calls, desc):
                yield i, result
                if fn.__name__ == "run_shard":
                    raise KeyboardInterrupt

    cfg = config(tiny_example, s3_prefix, max_shard_size="100KB")
    with pytest.raises(KeyboardInterrupt):
        run_merge(cfg, executor=StopAfterOne("cpu"))
    assert output_state(s3_prefix) == "absent" and len(staging_prefixes(s3_prefix)) == 1
    report = run_merge(cfg.model_copy(update={"resume": True}))
    assert 0 < len(report.resumed_files) < len(report.outputs)
    assert main(["verify", s3_prefix]) == 0


def test_report_less_prefix_is_not_an_output(s3_prefix):
    storage.write_bytes(f"{s3_prefix}/model.safetensors", b"not ours")
    assert output_state(s3_prefix) == "foreign"
    assert main(["verify", s3_prefix]) == 2


def test_expand_reads_and_writes_the_store(tiny_example, s3_prefix, tmp_path):
    artefact = f"{s3_prefix}/tsv_c"
    run_merge(config(tiny_example, artefact, method="tsv_c"))
    assert main(["expand", "--artefact", artefact, "--base", tiny_example[0], "--task", "1",
                 "--out", f"{s3_prefix}/task1"]) == 0
    assert main(["expand", "--artefact", artefact, "--base", tiny_example[0], "--task", "1",
                 "--out", str(tmp_path / "task1")]) == 0
    assert output_bytes(f"{s3_prefix}/task1") == output_bytes(tmp_path / "task1")
    assert main(["verify", f"{s3_prefix}/task1"]) == 0


def test_bench_results_and_task_vectors_go_to_the_store(tiny_suite, s3_prefix):
    from pipeline.bench.runner import BenchOptions, run_bench
    path, _, _ = tiny_suite
    out = f"{s3_prefix}/bench"
    summary = run_bench(BenchOptions(suite=path, tasks=2, methods=("task_arithmetic",),
                                     out=out, engine="local"), log=lambda *_: None)
    assert {"summary.json", "summary.parquet", "summary.md"} <= set(storage.list_names(out))
    assert b'"rows"' in storage.read_bytes(f"{out}/summary.json")
    assert main(["verify", f"{out}/task_vectors/task_arithmetic"]) == 0
    assert summary.rows["task_arithmetic"].alpha is not None


def test_the_suite_cache_can_live_on_the_store(tiny_suite, s3_prefix, tmp_path, monkeypatch):
    """A suite this machine has is uploaded whole; a machine without it fetches it."""
    from pipeline.bench.suites.build import ensure_suite
    path, cache, _ = tiny_suite
    monkeypatch.setenv("MERGE_PIPELINE_CACHE", cache)
    assert ensure_suite("tiny", s3_prefix, log=lambda *_: None) == path
    shared = f"{s3_prefix}/suites/{os.path.basename(path)}"
    assert output_state(shared) == "foreign"  # committed, with suite.json as its commit point
    assert storage.exists(f"{shared}/suite.json") and COMMIT_MARK not in storage.list_names(
        shared)

    monkeypatch.setenv("MERGE_PIPELINE_CACHE", str(tmp_path / "fresh-machine"))
    fetched = ensure_suite("tiny", s3_prefix, log=lambda *_: None)
    assert fetched.startswith(str(tmp_path / "fresh-machine"))
    assert storage.list_files(fetched) == storage.list_files(path)
    for name in storage.list_files(path):
        assert open(os.path.join(fetched, name), "rb").read() == open(
            os.path.join(path, name), "rb").read()


def test_a_nightly_with_every_output_on_the_store(tiny_suite, s3_prefix):
    """History, report, work directory (bench results, task vectors) all on the store: what a
    cluster without a shared volume runs."""
    from pipeline.history.nightly import NightlyConfig, run_nightly
    from pipeline.history.store import read_history
    config = NightlyConfig(history=f"{s3_prefix}/history", report=f"{s3_prefix}/report.html",
                           work_dir=f"{s3_prefix}/work", suites=[tiny_suite[0]],
                           task_counts=[2], methods=["task_arithmetic"], engine="local",
                           keep_task_vectors=True)
    result = run_nightly(config, log=lambda *_: None)
    assert result.exit_code == 0 and result.failures == []
    assert read_history(config.history).num_rows > 0
    assert b"<html" in storage.read_bytes(config.report).lower()
    cell = result.cells[0]["out"]
    assert cell.startswith(f"{s3_prefix}/work/") and storage.exists(f"{cell}/summary.json")
    assert main(["verify", f"{cell}/task_vectors/task_arithmetic"]) == 0
    assert storage.exists(f"{s3_prefix}/work/{result.run_id}/nightly.json")


def test_an_unreachable_store_is_one_line_before_anything(tiny_example, monkeypatch, capsys,
                                                          tmp_path):
    """A wrong endpoint (or no network) for --out, an input or verify: one line, exit 2,
    nothing written anywhere, no traceback."""
    from s3_server import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    base, tuned = tiny_example
    common = ["merge", "--engine", "local", "--method", "iso_c", "--alpha", "1"]
    for argv in (["--base", base, "--finetuned", *tuned, "--out", "s3://nowhere/out"],
                 ["--base", "s3://nowhere/base", "--finetuned", *tuned,
                  "--out", str(tmp_path / "out")],
                 ):
        assert main([*common, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot reach its storage" in err and len(err.splitlines()) == 1, err
    assert main(["verify", "s3://nowhere/out"]) == 2
    assert "cannot reach its storage" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_suite_in_a_shared_cache_is_evaluated_from_the_store(tiny_suite, s3_prefix,
                                                                monkeypatch, tmp_path):
    """With `--cache s3://...` the suite's manifest, data, heads and models are read from the
    store (what every node of a cluster without a shared filesystem reaches), and count what
    the local copy counts; bench merges read their inputs from there too."""
    from pipeline.bench.runner import BenchOptions, open_task_set, run_bench
    from pipeline.evaluation.pool import EvaluationPool
    from pipeline.models.weights import Weights
    path, cache, _ = tiny_suite
    monkeypatch.setenv("MERGE_PIPELINE_CACHE", cache)
    shared = open_task_set("tiny", count=2, cache=s3_prefix, log=lambda *_: None)
    local = open_task_set(path, count=2, log=lambda *_: None)
    assert shared.manifest.location.startswith(f"{s3_prefix}/suites/")
    assert shared.base.startswith("s3://") and all(
        t.data_location.startswith("s3://") and t.finetuned.startswith("s3://")
        for t in shared.tasks)
    requests = [(Weights.base(), t, s) for t in shared.task_names for s in ("val", "test")]
    counts = [EvaluationPool(ts.base, ts.tasks, "local", preprocess="clip").counts(requests)
              for ts in (shared, local)]
    assert counts[0] == counts[1]
    summary = run_bench(BenchOptions(suite="tiny", tasks=2, methods=("task_arithmetic",),
                                     out=str(tmp_path / "bench"), engine="local",
                                     cache=s3_prefix), log=lambda *_: None)
    assert summary.suite_dir.startswith("s3://") and summary.rows["task_arithmetic"].alpha
