"""The nightly run, the report, and `--history` on the recording commands (in-process engine)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import re

import pytest

from pipeline.cli.main import main
from pipeline.errors import InputError
from pipeline.history.nightly import EXIT_REGRESSION, NightlyConfig, load_nightly_config, run_nightly
from pipeline.history.store import MEAN, append_run, read_history
from pipeline.methods import registry
from pipeline.methods.isotropic import iso_cts_subspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_shipped_nightly_config_loads_and_flags_override_it():
    config = load_nightly_config(os.path.join(REPO, "cluster", "nightly.yaml"),
                                 history="/tmp/h", task_counts=[2], workers=None)
    assert config.history == "/tmp/h" and config.task_counts == [2]
    assert "iso_cts" in config.methods and config.thresholds.window >= 1
    assert config.params["iso_cts"]["common_space_fraction"] == 0.8


@pytest.mark.parametrize("text, message", [
    ("history: h\nreport: r\nwork_dir: w\nmethods: [iso_cts, nope]\n", "nope"),
    ("history: h\nreport: r\nwork_dir: w\ntask_count: [8]\n", "unknown nightly fields"),
    ("history: h\nreport: r\nwork_dir: w\ntask_counts: [0]\n", "task_counts"),
    ("history: h\nreport: r\nwork_dir: w\nthresholds: {window: 0}\n", "window"),
    ("report: r\nwork_dir: w\n", "history"),
])
def test_bad_nightly_configs_fail_before_any_work(tmp_path, text, message):
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_nightly_config(str(path))


def _plant_better_night(history: str, run_id: str, gain: float) -> None:
    """Copy run `run_id` two days earlier with every mean accuracy `gain` higher."""
    rows = [r for r in read_history(history).to_pylist() if r["run_id"] == run_id]
    planted = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "date"}
        r["run_id"] = "planted-" + run_id
        r["timestamp"] = r["timestamp"] - dt.timedelta(days=2)
        if r["task"] == MEAN and r["method"] not in ("zero_shot", "finetuned"):
            r["normalized_accuracy"] += gain
        planted.append(r)
    append_run(history, planted)


@pytest.mark.slow
def test_nightly_records_judges_and_reports(tiny_suite, tmp_path):
    suite_dir = tiny_suite[0]
    config = NightlyConfig(history=str(tmp_path / "history"), report=str(tmp_path / "r.html"),
                           work_dir=str(tmp_path / "work"), suites=[suite_dir],
                           task_counts=[2], methods=["task_arithmetic", "iso_c"],
                           engine="local")
    first = run_nightly(config, log=lambda *_: None)
    assert first.exit_code == 0 and first.regressions == [] and first.failures == []
    history = read_history(config.history)
    assert set(history.column("run_id").to_pylist()) == {first.run_id}
    means = {r["method"]: r for r in history.to_pylist() if r["task"] == MEAN}
    assert set(means) == {"zero_shot", "finetuned", "task_arithmetic", "iso_c"}
    assert means["finetuned"]["normalized_accuracy"] == 1.0
    assert means["iso_c"]["merge_seconds"] > 0 and means["iso_c"]["model_params"] > 0
    assert means["iso_c"]["alpha"] in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1,
                                       1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2,
                                       2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0)
    assert not os.path.exists(os.path.join(config.work_dir, first.run_id, "tiny", "task_vectors"))

    # Same code, same suite: the same accuracies, so nothing fires.
    second = run_nightly(config, log=lambda *_: None)
    assert second.exit_code == 0, [r.describe() for r in second.regressions]

    # Two planted better nights before them: the median of the 4 earlier runs is now 2.5
    # points above tonight.
    _plant_better_night(config.history, first.run_id, gain=0.05)
    _plant_better_night(config.history, second.run_id, gain=0.05)
    third = run_nightly(config, log=lambda *_: None)
    assert third.exit_code == EXIT_REGRESSION
    assert {(r.metric, r.method) for r in third.regressions} == {
        ("normalized_accuracy", "task_arithmetic"), ("normalized_accuracy", "iso_c")}
    summary = json.loads(open(os.path.join(config.work_dir, third.run_id,
                                           "nightly.json")).read())
    assert summary["exit_code"] == EXIT_REGRESSION and len(summary["regressions"]) == 2
    page = open(config.report, encoding="utf-8").read()
    assert "2 regression(s) crossed" in page and third.run_id in page
    check_self_contained(page, images=3)

    # The report command rebuilds the same judgement from the history alone.
    out = tmp_path / "again.html"
    assert main(["report", "--history", config.history, "--out", str(out)]) == 0
    assert "2 regression(s) crossed" in out.read_text()


def check_self_contained(page: str, images: int) -> None:
    """Every image inline and a real PNG; nothing fetched from anywhere."""
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == images
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<link" not in page


def _iso_cts_without_flattening(deltas, *, common_space_fraction: float = 0.8):
    """Iso-CTS with its one defining step removed: the singular values kept as they came."""
    polar_u, s_all, polar_vh = iso_cts_subspace(deltas, common_space_fraction)
    return ((polar_u * s_all) @ polar_vh).to(deltas.dtype)


@pytest.mark.slow
def test_the_nightly_flags_a_broken_iso_cts_against_normal_nights(tiny_suite, tmp_path,
                                                                   monkeypatch):
    config = NightlyConfig(history=str(tmp_path / "history"), report=str(tmp_path / "r.html"),
                           work_dir=str(tmp_path / "work"), suites=[tiny_suite[0]],
                           task_counts=[None], methods=["task_arithmetic", "iso_cts"],
                           engine="local")
    normal = [run_nightly(config, log=lambda *_: None) for _ in range(2)]
    assert [n.exit_code for n in normal] == [0, 0]

    spec = registry._REGISTRY["iso_cts"]
    monkeypatch.setitem(registry._REGISTRY, "iso_cts",
                        dataclasses.replace(spec, fn=_iso_cts_without_flattening))
    broken = run_nightly(config, log=lambda *_: None)
    assert broken.exit_code == EXIT_REGRESSION
    flagged = {(r.method, r.metric) for r in broken.regressions}
    assert flagged == {("iso_cts", "normalized_accuracy")}, [r.describe() for r in
                                                              broken.regressions]
    assert "REGRESSION" in open(config.report, encoding="utf-8").read().upper()


def test_a_failed_cell_is_reported_and_the_others_still_recorded(tiny_suite, tmp_path):
    config = NightlyConfig(history=str(tmp_path / "history"), report=str(tmp_path / "r.html"),
                           work_dir=str(tmp_path / "work"), suites=[tiny_suite[0]],
                           task_counts=[99, 2], methods=["task_arithmetic"], engine="local")
    result = run_nightly(config, log=lambda *_: None)
    assert result.exit_code == 3
    assert [f["cell"] for f in result.failures] == [f"{os.path.basename(tiny_suite[0])}-T99"]
    assert "--tasks must be between 1 and 4" in result.failures[0]["error"]
    assert {r["num_tasks"] for r in read_history(config.history).to_pylist()} == {2}
    assert "Failed cells" in open(config.report, encoding="utf-8").read()


def test_an_empty_history_still_gives_a_report(tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", "--history", str(tmp_path / "none"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "No benchmark runs in the history yet" in page
    check_self_contained(page, images=0)


def test_merge_with_history_records_its_time_and_size(tiny_example, tmp_path):
    base, tuned = tiny_example
    history = str(tmp_path / "history")
    assert main(["merge", "--engine", "local", "--base", base, "--finetuned", *tuned,
                 "--method", "tsv_m", "--alpha", "1.0", "--out", str(tmp_path / "m"),
                 "--history", history]) == 0
    (row,) = read_history(history).to_pylist()
    assert (row["kind"], row["method"], row["num_tasks"]) == ("merge", "tsv_m", 3)
    assert row["merge_seconds"] > 0 and row["model_params"] > 1000
    assert row["peak_memory_bytes"] > 0 and row["model"] == base
    assert json.loads(row["hardware"])["cpus"] == os.cpu_count()


@pytest.mark.slow
def test_evaluate_with_history_records_per_task_accuracy(tiny_suite, tmp_path):
    history = str(tmp_path / "history")
    assert main(["evaluate", "--suite", tiny_suite[0], "--tasks", "2", "--engine", "local",
                 "--history", history]) == 0
    rows = read_history(history).to_pylist()
    assert [r["task"] for r in rows][-1] == MEAN and len(rows) == 3
    assert all(r["kind"] == "evaluate" and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["normalized_accuracy"] > 0 for r in rows)
