"""`ray_jobs/merge.py` is what `ray job submit` runs: it must work as a script, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "ray_jobs"))

from evaluate import evaluate_argv  # noqa: E402
from pipeline.cli.ray_job import job_argv  # noqa: E402


def test_inside_a_ray_job_the_entrypoint_joins_the_cluster(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert job_argv("merge", ["--config", "c.yaml"]) == ["merge", "--config", "c.yaml", "--address", "auto"]
    assert job_argv("merge", ["--address", "ray://h:10001"]) == ["merge", "--address", "ray://h:10001"]
    monkeypatch.delenv("RAY_JOB_ID")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_argv("merge", ["--config", "c.yaml"]) == ["merge", "--config", "c.yaml"]


def test_evaluate_entrypoint_defaults_to_bench_and_joins_the_cluster(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert evaluate_argv(["--out", "o"]) == ["bench", "--out", "o", "--address", "auto"]
    assert evaluate_argv(["sweep", "--engine", "local"]) == ["sweep", "--engine", "local"]


@pytest.mark.slow
def test_evaluate_job_runs_a_bench_on_embedded_ray(tiny_suite, tmp_path):
    suite_dir = tiny_suite[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MERGE_PIPELINE_PROGRESS"] = "0"
    result = subprocess.run([sys.executable, os.path.join(REPO, "ray_jobs", "evaluate.py"),
                             "bench", "--suite", suite_dir, "--tasks", "2", "--methods",
                             "task_arithmetic", "--workers", "2", "--out",
                             str(tmp_path / "bench")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert summary["evaluation"]["engine"] == "ray"
    assert summary["evaluation"]["evaluators"] == 2
    assert set(summary["rows"]) == {"zero_shot", "finetuned", "task_arithmetic"}


@pytest.mark.slow
def test_job_script_merges_through_embedded_ray(tiny_example, tmp_path):
    base, tuned = tiny_example
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "base": base, "finetuned": list(tuned), "method": "iso_cts", "alpha": 1.0,
        "params": {"common_space_fraction": 0.75}, "out": str(tmp_path / "merged"),
        "workers": 2, "fuse_qkv": True, "engine": "ray"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MERGE_PIPELINE_PROGRESS"] = "0"
    result = subprocess.run([sys.executable, os.path.join(REPO, "ray_jobs", "merge.py"),
                             "--config", str(config)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "iso_cts: 3 tasks" in result.stdout
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["engine"]["kind"] == "ray" and report["engine"]["workers"] == 2
    assert report["params"] == {"common_space_fraction": 0.75}
    assert report["options"]["fuse_qkv"] is True
