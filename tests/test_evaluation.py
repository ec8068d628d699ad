"""Evaluation: the model matches the real CLIP architecture, alpha selection follows the spec,
the actor pool counts exactly what one process counts, and the tiny suite behaves like a
merging benchmark (merged accuracy between zero-shot and fine-tuned)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.evaluation.search import (EARLY_STOP_PATIENCE, absolute, normalized,
                                        select_alpha)
from pipeline.models.vit import ClipVisionTower, VisionConfig, init_clip_weights
from pipeline.models.weights import Weights

SMALL = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, image_size=16, patch_size=4, projection_dim=24)


# ---- the model is CLIP's --------------------------------------------------------------------

def test_the_tower_is_transformers_clip_and_saved_directories_load(tmp_path):
    """A directory saved by transformers itself evaluates with the same embeddings; the
    suite's own save_model writes what transformers loads. No skip: transformers is a
    runtime dependency of evaluation."""
    import transformers
    from pipeline.evaluation.evaluator import Evaluator
    from pipeline.bench.suites.build import save_model
    ours = ClipVisionTower(SMALL)
    assert isinstance(ours, transformers.CLIPVisionModelWithProjection)
    init_clip_weights(ours, seed=3)
    save_model(ours, str(tmp_path / "ours"))
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "ours"))
    hf.save_pretrained(tmp_path / "hf")
    evaluator = Evaluator(str(tmp_path / "hf"))
    pixels = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = ours.eval().embed(pixels)
        torch.testing.assert_close(hf.eval()(pixel_values=pixels).image_embeds, expected)
        torch.testing.assert_close(evaluator.model.embed(pixels), expected)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    from pipeline.bench.suites.build import save_model
    from pipeline.evaluation.evaluator import Evaluator
    save_model(ClipVisionTower(SMALL), str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="encoder.layers.2"):
        Evaluator(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(InputError, match="add a config.json with num_attention_heads"):
        Evaluator(str(tmp_path / "m"))  # 2 heads of width 16: no shape tells that


# ---- metrics and alpha selection (spec section 4) -----------------------------------------

def test_normalized_is_a_mean_of_ratios():
    acc, ft = {"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9}
    assert normalized(acc, ft) == pytest.approx((0.5 + 1.0) / 2)
    assert normalized(acc, ft) != pytest.approx(absolute(acc) / absolute(ft))


def _stub(curve):
    """Validation accuracies of two tasks from a curve alpha -> (acc_a, acc_b)."""
    seen = []

    def validate(alphas):
        seen.extend(alphas)
        return [dict(zip("ab", curve(a))) for a in alphas]
    return validate, seen


def test_select_alpha_is_the_argmax_of_normalized_validation_accuracy():
    grid = [0.1 * i for i in range(1, 31)]
    # Task a peaks at 1.2, task b at 2.0; b's fine-tuned accuracy is low, so normalising
    # moves the optimum of the mean towards b: argmax of the normalised mean is 1.6-ish.
    ft = {"a": 1.0, "b": 0.5}
    curve = lambda x: (0.9 - 0.1 * (x - 1.2) ** 2, 0.45 - 0.1 * (x - 2.0) ** 2)
    validate, seen = _stub(curve)
    result = select_alpha(grid, validate, ft)
    expected = max(grid, key=lambda x: (curve(x)[0] / 1.0 + curve(x)[1] / 0.5))
    assert result.alpha == expected
    assert seen == grid  # every alpha, validation only
    assert max(grid, key=lambda x: sum(curve(x))) != expected  # normalising mattered


def test_select_alpha_takes_the_first_of_ties():
    validate, _ = _stub(lambda x: (0.5, 0.5) if x < 0.25 else (0.7, 0.7))
    assert select_alpha([0.1, 0.2, 0.3, 0.4], validate, {"a": 1, "b": 1}).alpha == 0.3


def test_early_stopping_follows_the_spec_and_ignores_wave_size():
    grid = [0.1 * i for i in range(1, 31)]
    curve = lambda x: (1 - abs(x - 0.7), 1 - abs(x - 0.7))
    results = []
    for wave in (1, 4, 30):
        validate, seen = _stub(curve)
        result = select_alpha(grid, validate, {"a": 1, "b": 1}, early_stop=True, wave=wave)
        assert result.stopped_early
        results.append((result.alpha, [r["alpha"] for r in result.evaluated]))
    assert all(r == results[0] for r in results)
    alpha, evaluated = results[0]
    assert alpha == grid[6]
    assert len(evaluated) == 7 + EARLY_STOP_PATIENCE


class _RecordingPool:
    """A pool whose accuracy is a known function of (alpha, task, split); records requests."""
    workers = 2

    def __init__(self):
        self.requests = []

    def counts(self, requests, desc=""):
        self.requests.extend(requests)
        out = []
        for weights, task, split in requests:
            peak = {"val": 1.5, "test": 0.5}[split]  # test would pull alpha elsewhere
            acc = max(0.0, 0.9 - 0.2 * abs(weights.alpha - peak))
            out.append((round(1000 * acc), 1000))
        return out


def test_sweep_never_looks_at_test_before_choosing():
    from pipeline.bench.runner import sweep_task_vector
    pool = _RecordingPool()
    grid = [0.1 * i for i in range(1, 31)]
    result = sweep_task_vector(pool, "tv", ["x", "y"], grid, {"x": 1.0, "y": 1.0}, False)
    assert result["alpha"] == pytest.approx(1.5)
    splits = [split for _, _, split in pool.requests]
    first_test = splits.index("test")
    assert "test" not in splits[:first_test] and set(splits[first_test:]) == {"test"}
    assert {w.alpha for w, _, s in pool.requests if s == "test"} == {result["alpha"]}


# ---- the tiny suite, end to end ------------------------------------------------------------

def _pool(suite_dir, tasks, engine, **kw):
    from pipeline.bench.runner import open_task_set
    from pipeline.evaluation.pool import EvaluationPool
    task_set = open_task_set(suite_dir, log=lambda *_: None)
    chosen = [t for t in task_set.tasks if t.name in tasks]
    return EvaluationPool(task_set.base, chosen, engine,
                          preprocess=task_set.manifest.manifest.preprocess, **kw)


def test_tiny_suite_builds_once_and_is_cached(tiny_suite):
    from pipeline.bench.suites.build import ensure_suite
    path, cache, _ = tiny_suite
    meta = json.loads(open(os.path.join(path, "suite.json")).read())
    assert [t["name"] for t in meta["tasks"]] == ["digits", "shapes", "orientation", "hue"]
    logged = []
    assert ensure_suite("tiny", cache, log=logged.append) == path and not logged
    assert not [d for d in os.listdir(os.path.dirname(path)) if d.startswith(".")]


def test_real_data_splits_are_disjoint():
    from pipeline.bench.suites.tasks import make_split
    rows = {s: {bytes(x) for x in make_split("digits", s, 10_000, 0, 32)[0]}
            for s in ("train", "val", "test")}
    assert sum(map(len, rows.values())) > 1700
    assert not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])


def test_generated_tasks_are_deterministic():
    from pipeline.bench.suites.tasks import TASKS, make_split
    for task in TASKS:
        a, b = make_split(task, "val", 20, 7, 32), make_split(task, "val", 20, 7, 32)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), task
        assert not np.array_equal(a[0], make_split(task, "test", 20, 7, 32)[0]), task


def test_every_task_shows_every_class_in_uint8_images():
    from pipeline.bench.suites.tasks import TASKS, make_split
    for name, task in TASKS.items():
        images, labels = make_split(name, "train", 120, 3, 32)
        assert images.dtype == np.uint8 and images.shape == (len(labels), 3, 32, 32), name
        assert set(labels.tolist()) == set(range(len(task.classes))), name
        assert images.std() > 5, name  # not a blank canvas


def test_pool_counts_equal_single_process_counts(tiny_suite, ray_cluster):
    path, _, _ = tiny_suite
    tasks = ["digits", "hue"]
    tv = os.path.join(path, "finetuned", "digits")  # any checkpoint-shaped tensors will do
    requests = [(w, t, s) for w in (Weights.base(), Weights.model(tv),
                                    Weights.delta(tv, 0.05), Weights.delta(tv, 0.1))
                for t in tasks for s in ("val", "test")]
    local = _pool(path, tasks, "local")
    expected = local.counts(requests)
    for workers in (1, 3):
        pool = _pool(path, tasks, "ray", workers=workers, shard_rows=100)
        try:
            assert pool.counts(requests) == expected
        finally:
            pool.close()


def test_killed_evaluation_actor_is_restarted_and_counts_are_unchanged(tiny_suite,
                                                                        ray_cluster):
    path, _, _ = tiny_suite
    tasks = ["digits", "shapes", "orientation", "hue"]
    tv = os.path.join(path, "finetuned", "shapes")
    requests = [(Weights.delta(tv, a / 10), t, s) for a in range(1, 31) for t in tasks
                for s in ("val", "test")]
    expected = _pool(path, tasks, "local").counts(requests)
    pool = _pool(path, tasks, "ray", workers=2, shard_rows=100)
    try:
        victim = pool.actor_pids()[0]
        result = {}
        sweep = threading.Thread(target=lambda: result.update(c=pool.counts(requests)))
        sweep.start()
        time.sleep(0.3)
        assert sweep.is_alive(), "sweep finished before the kill; make it longer"
        os.kill(victim, signal.SIGKILL)
        sweep.join(timeout=120)
        assert result["c"] == expected
        assert victim not in pool.actor_pids()  # the actor really died and was restarted
    finally:
        pool.close()


def test_merged_accuracy_lies_between_zero_shot_and_finetuned(tiny_suite, tmp_path):
    from pipeline.bench.runner import BenchOptions, run_bench
    path, cache, _ = tiny_suite
    summary = run_bench(BenchOptions(suite=path, methods=("task_arithmetic", "tsv_m"),
                                     out=str(tmp_path / "bench"), engine="local"),
                        log=lambda *_: None)
    rows = summary.rows
    n_test = min(json.loads(open(os.path.join(path, "suite.json")).read())["tasks"][i]
                 ["examples"]["test"] for i in range(4))
    # Two binomial standard errors of a mean over T tasks: the noise the bounds allow.
    noise = 2 * math.sqrt(0.25 / (n_test * len(summary.tasks)))
    zero, ft = rows["zero_shot"].absolute, rows["finetuned"].absolute
    assert ft > zero + 4 * noise, "fine-tuning must clearly beat zero-shot on the suite"
    for method in ("task_arithmetic", "tsv_m"):
        assert zero - noise <= rows[method].absolute <= ft + noise, method
        assert rows[method].alpha is not None
    for name in ("summary.json", "summary.parquet", "summary.md"):
        assert os.path.isfile(tmp_path / "bench" / name)
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "bench" / "summary.parquet").to_pylist()
    means = {r["method"]: r["normalized"] for r in table if r["task"] == "mean"}
    assert means["finetuned"] == pytest.approx(1.0)
    assert means["tsv_m"] == pytest.approx(rows["tsv_m"].normalized)


def test_cli_evaluate_sweep_and_bench(tiny_suite, tmp_path, capsys):
    from pipeline.cli.main import main
    path, cache, _ = tiny_suite
    common = ["--suite", path, "--tasks", "2", "--engine", "local"]
    assert main(["merge", "--base", os.path.join(path, "pretrained"), "--finetuned",
                 os.path.join(path, "finetuned", "digits"),
                 os.path.join(path, "finetuned", "shapes"), "--method", "iso_c",
                 "--output", "task_vector", "--engine", "local",
                 "--out", str(tmp_path / "tv")]) == 0
    assert main(["sweep", *common, "--task-vector", str(tmp_path / "tv"), "--grid",
                 "0.5,1.0,1.5", "--json", str(tmp_path / "sweep.json")]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["alpha"] in (0.5, 1.0, 1.5) and len(sweep["sweep"]) == 3
    assert main(["evaluate", *common, "--task-vector", str(tmp_path / "tv"), "--alpha",
                 str(sweep["alpha"]), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == sweep["test"]
    assert main(["bench", *common, "--methods", "average", "--out",
                 str(tmp_path / "b")]) == 0
    assert "| average | 0.5 |" in capsys.readouterr().out
    assert main(["bench", *common, "--methods", "tsv_c", "--out", str(tmp_path / "c")]) == 2
    assert main(["sweep", *common, "--task-vector", str(tmp_path / "tv"), "--grid",
                 "0,1"]) == 2


def test_bench_runs_each_task_count_into_its_own_directory(tiny_suite, tmp_path, capsys):
    from pipeline.cli.main import main
    path, _, _ = tiny_suite
    out = tmp_path / "b"
    assert main(["bench", "--suite", path, "--tasks", "2,3", "--engine", "local",
                 "--methods", "average", "--out", str(out)]) == 0
    for count in (2, 3):
        summary = json.loads((out / f"T{count}" / "summary.json").read_text())
        assert summary["num_tasks"] == count and len(summary["tasks"]) == count
    assert sorted(os.listdir(out)) == ["T2", "T3"]
    assert "T=2" in capsys.readouterr().out
    for bad in ("0", "2,x", ",", "-1"):
        with pytest.raises(SystemExit):
            main(["bench", "--suite", path, "--tasks", bad, "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")
    # Every count and every output directory is checked before the first count runs.
    capsys.readouterr()
    assert main(["bench", "--suite", path, "--tasks", "2,99", "--engine", "local",
                 "--methods", "average", "--out", str(tmp_path / "y")]) == 2
    assert "between 1 and" in capsys.readouterr().err
    os.makedirs(tmp_path / "z" / "T3")
    assert main(["bench", "--suite", path, "--tasks", "2,3", "--engine", "local",
                 "--methods", "average", "--out", str(tmp_path / "z")]) == 2
    assert not os.path.exists(tmp_path / "y") and os.listdir(tmp_path / "z") == ["T3"]


def test_bench_task_counts_of_a_built_suite_come_from_its_suite_json(tmp_path):
    from pipeline.bench.runner import bench_task_counts
    from pipeline.errors import InputError
    (tmp_path / "suite.json").write_text(json.dumps(
        {"tasks": [{"name": f"t{i}"} for i in range(5)], "spec": {"bench_counts": [2, 4]}}))
    assert bench_task_counts(str(tmp_path), None) == [2, 4]
    assert bench_task_counts(str(tmp_path), None, [5, 1]) == [5, 1]
    with pytest.raises(InputError, match="between 1 and 5"):
        bench_task_counts(str(tmp_path), None, [3, 6])
    assert bench_task_counts("standard", None) == [8, 14, 20]
    (tmp_path / "suite.json").write_text("{not json")
    with pytest.raises(InputError, match="not a built suite's record"):
        bench_task_counts(str(tmp_path), None)
    with pytest.raises(InputError, match="between 1 and 20"):
        bench_task_counts("standard", None, [21])


def test_regime_reports_geometry_and_cross_task_accuracy(tiny_suite, tmp_path):
    from safetensors.torch import load_file

    from pipeline.cli.main import main
    path, _, _ = tiny_suite
    assert main(["regime", "--suite", path, "--tasks", "3", "--engine", "local",
                 "--json", str(tmp_path / "regime.json")]) == 0
    report = json.loads((tmp_path / "regime.json").read_text())
    tasks = report["order"]
    assert tasks == ["digits", "shapes", "orientation"] and report["split"] == "val"

    def flat(directory):
        state = load_file(os.path.join(directory, "model.safetensors"))
        return torch.cat([state[k].double().flatten() for k in sorted(state)
                          if state[k].is_floating_point()])
    theta0 = flat(os.path.join(path, "pretrained"))
    taus = [flat(os.path.join(path, "finetuned", t)) - theta0 for t in tasks]
    for t, tau in zip(tasks, taus):  # an independent computation over the whole file
        assert report["tasks"][t]["tau_norm_ratio"] == pytest.approx(
            float(tau.norm() / theta0.norm()), rel=1e-9)
    cosine = np.array(report["cosine"])
    assert cosine[0, 1] == pytest.approx(float(taus[0] @ taus[1] / taus[0].norm()
                                               / taus[1].norm()), rel=1e-9)
    assert np.allclose(np.diag(cosine), 1) and np.allclose(cosine, cosine.T)
    for i, t in enumerate(tasks):
        row = report["tasks"][t]
        assert 0 < row["zero_shot"] < row["finetuned"] <= 1
        assert report["cross"][i][i] == pytest.approx(row["finetuned"] / row["zero_shot"])
        others = [report["cross"][i][j] for j in range(3) if j != i]
        assert row["cross_relative"] == pytest.approx(sum(others) / 2)
        assert 0 <= row["cross_worst"] <= row["cross_relative"]
