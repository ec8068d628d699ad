"""End to end: "bring your own tasks" through a task manifest.

The built-in suite, exported as parquet + heads + manifest.yaml, must give the counts an
independent reference computes from the suite's own generators; a user-like manifest mixing
every data layout (HF parquet, save_to_disk, image folder) and head kind (the papers' pickle,
safetensors, zero-shot) and checkpoint layout (HF directory, the papers' open_clip `.pt`) must
evaluate and benchmark through the CLI, in-process and on a Ray pool alike; every mistake a user
can make in one is one line, exit 2, naming the task and the file. Everything is built here,
small, in tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from clip_fixtures import make_tiny_clip_dir
from dataset_fixtures import (
    labelled,
    sample_images,
    write_hf_parquet,
    write_image_folder,
    write_save_to_disk,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset, random_split
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from pipeline.bench.runner import open_task_set
from pipeline.cli.main import main
from pipeline.errors import InputError
from pipeline.evaluation.manifest import load_manifest
from pipeline.evaluation.pool import EvaluationPool
from pipeline.evaluation.tasks import resolve_task
from pipeline.io.layout import hf_to_open_clip
from pipeline.models.vit import CLIP_MEAN, CLIP_STD, pixels_from_uint8
from pipeline.models.weights import Weights

SPLITS = ("val", "test")

# The user-like model: small enough to evaluate in milliseconds, CLIP-shaped in every way.
VISION: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=1, image_size=32, patch_size=8,
                              projection_dim=16, hidden_act="quick_gelu")
CLASSES = ("cat", "dog", "photo")  # sorted: an image folder's labels are the sorted folder order
# Rows per split of the three user tasks (task B has its own validation split).
ROWS = {"alpha": {"train": 50, "test": 30}, "beta": {"train": 20, "validation": 12, "test": 30},
        "gamma": {"train": 50, "test": 30}}
TEMPLATES = ["a photo of a {}.", "a blurry {} picture."]
# Task gamma states its fine-tuned accuracy instead of having its checkpoint evaluated.
GAMMA_FINETUNED = {"validation": 0.8, "test": 0.75}
PAPERS_VAL = 5  # int(50 * 0.1): the papers' validation draw from a 50-row train split


# ---- helpers ------------------------------------------------------------------------------------

def quiet(*_: object) -> None:
    """The task-set log line is not what these tests look at."""


def write_yaml(path: Path, values: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return str(path)


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(capsys, argv: Sequence[str]) -> tuple[int, str, str]:
    """`main(argv)` with its stdout and stderr (whatever fixtures printed before is dropped)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys, manifest: str, *named: str) -> str:
    """`evaluate --tasks-file manifest` fails as a user error: exit 2, exactly one line on
    stderr, naming every string in `named`."""
    code, _, err = cli(capsys, ["evaluate", "--tasks-file", manifest, "--engine", "local"])
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def randomized(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norms and biases too), from one seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model.eval()


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.005
              ) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' twin of `state`: every float tensor moved a little, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous()
            if v.is_floating_point() else v for k, v in state.items()}


def hf_vision(state: dict[str, torch.Tensor] | None = None, seed: int = 0
              ) -> CLIPVisionModelWithProjection:
    """transformers' own CLIPVisionModelWithProjection (sdpa), random or holding `state`."""
    fields: dict[str, Any] = {**VISION, "attn_implementation": "sdpa"}
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**fields))
    randomized(model, seed)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


# The authors' head class, as a module the loader cannot import: created in memory, used to
# pickle a head, then removed from sys.modules (as on the machine that evaluates).
AUTHORS_MODULE = "byot_authors_modeling"
AUTHORS_SOURCE = """
import torch


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        classes, dim = weights.shape
        super().__init__(dim, classes)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None
                                       else torch.zeros(classes))


class Extra:
    pass
"""


def save_authors_head(path: Path, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      extra: bool = False) -> None:
    """torch.save of the authors' ClassificationHead (with a smuggled nested object when
    `extra`); afterwards the module is gone, so a plain torch.load cannot read the file."""
    module = types.ModuleType(AUTHORS_MODULE)
    exec(compile(AUTHORS_SOURCE, AUTHORS_MODULE, "exec"), module.__dict__)
    sys.modules[AUTHORS_MODULE] = module
    try:
        head = module.ClassificationHead(True, weight, bias)
        if extra:
            head.extra = module.Extra()
        torch.save(head, path)
    finally:
        del sys.modules[AUTHORS_MODULE]


class _Payload:
    """What a hostile 'head' file carries: unpickling it would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]], dtype=np.float64)


def coloured(n: int, size: int, seed: int) -> list[tuple[Image.Image, int]]:
    """`n` textured images whose class (cycling through CLASSES) is their dominant colour: a
    random tower separates them, so accuracies are well above zero and the normalised
    accuracy a benchmark divides by is defined."""
    out = []
    for i, image in enumerate(sample_images(n, size, seed)):
        label = i % len(CLASSES)
        pixels = 0.35 * np.asarray(image, dtype=np.float64) + 0.65 * PALETTE[label]
        out.append((Image.fromarray(pixels.round().astype(np.uint8), "RGB"), label))
    return out


def prototypes(model: torch.nn.Module, samples: list[tuple[Image.Image, int]]) -> torch.Tensor:
    """A head of class means of the normalised image embeddings (a nearest-prototype
    classifier), [classes, projection_dim]."""
    with torch.inference_mode():
        embeds = F.normalize(model(pixel_values=clip_pixels([im for im, _ in samples]))
                             .image_embeds, dim=-1)
    labels = torch.tensor([label for _, label in samples])
    means = torch.stack([embeds[labels == c].mean(0) for c in range(len(CLASSES))])
    return F.normalize(means, dim=-1).contiguous()


def reference_counts(model: torch.nn.Module, pixels: torch.Tensor, labels: np.ndarray,
                     weight: torch.Tensor, bias: torch.Tensor | None = None) -> int:
    """Correct top-1 predictions of `normalize(embeds) @ weight.T (+ bias)`, computed in the
    evaluator's fixed batches of 100 on one thread (the same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(labels), 100):
                embeds = model(pixel_values=pixels[start:start + 100]).image_embeds
                logits = F.normalize(embeds.float(), dim=-1) @ weight.T
                if bias is not None:
                    logits = logits + bias
                pred = logits.argmax(-1).numpy()
                correct += int((pred == labels[start:start + 100]).sum())
        return correct
    finally:
        torch.set_num_threads(threads)


def clip_pixels(images: Sequence[Image.Image], size: int = 32) -> torch.Tensor:
    """CLIP's evaluation pixels for RGB images already square: bicubic resize to `size` (PIL,
    as torchvision's Resize calls it) and CLIP's mean/std."""
    arrays = [np.asarray(im.convert("RGB") if im.size == (size, size)
                         else im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
              for im in images]
    batch = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


# ---- 1. the exported built-in suite -------------------------------------------------------------

def test_exported_suite_counts_equal_an_independent_reference(tiny_suite):
    from pipeline.bench.suites.build import load_model
    from pipeline.bench.suites.tasks import make_split

    path = tiny_suite[0]
    meta = json.loads(Path(path, "suite.json").read_text())
    spec = meta["spec"]
    sizes = dict(zip(("train", "val", "test"), spec["sizes"]))  # build.py: zip(SPLITS, sizes)
    image_size = spec["model"]["image_size"]
    tasks = list(spec["tasks"])
    finetuned = os.path.join(path, "finetuned", "shapes")

    task_set = open_task_set(path, log=quiet)  # a built suite's directory: its manifest
    assert task_set.task_names == tasks
    assert task_set.manifest.digest == sha256_of(os.path.join(path, "manifest.yaml"))
    pool = task_set.pool("local", None, "cpu", None)
    requests = [(w, t, s) for w in (Weights.base(), Weights.model(finetuned))
                for t in tasks for s in SPLITS]
    counts = dict(zip(requests, pool.counts(requests)))

    models = {"base": load_model(os.path.join(path, "pretrained")).eval(),
              "finetuned": load_model(finetuned).eval()}
    parquet_split = {"val": "validation", "test": "test"}
    for task in tasks:
        # The frozen head training used; the exported one is it times the logit scale.
        head = load_file(os.path.join(path, "tasks", f"{task}.safetensors"))["head"].float()
        for split in SPLITS:
            images, labels = make_split(task, split, sizes[split], spec["seed"], image_size)
            assert len(labels) == meta["tasks"][tasks.index(task)]["examples"][split]
            # The exported parquet holds exactly these pixels (PNG is lossless) and labels.
            table = pq.read_table(os.path.join(
                path, "eval", task, "data", f"{parquet_split[split]}-00000-of-00001.parquet"))
            decoded = np.stack([np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
                                .transpose(2, 0, 1) for cell in table.column("image").to_pylist()])
            assert np.array_equal(decoded, images), (task, split)
            assert table.column("label").to_pylist() == labels.tolist()

            pixels = pixels_from_uint8(torch.from_numpy(images))
            for name, weights in (("base", Weights.base()),
                                  ("finetuned", Weights.model(finetuned))):
                expected = reference_counts(models[name], pixels, labels, head)
                assert counts[(weights, task, split)] == (expected, len(labels)), \
                    (name, task, split)
    # The references are not degenerate: fine-tuning on shapes moved shapes' accuracy.
    assert counts[(Weights.model(finetuned), "shapes", "test")] != \
        counts[(Weights.base(), "shapes", "test")]


# ---- 2. a user-like manifest: every layout, every head kind -------------------------------------

@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, Any]:
    """A user's tasks as they hold them, and the manifest that lists them (relative paths)."""
    root = tmp_path_factory.mktemp("user_tasks")
    models = root / "models"
    models.mkdir()
    clip = make_tiny_clip_dir(models / "clip", projection_dim=VISION["projection_dim"],
                              hidden_size=VISION["hidden_size"],
                              layers=VISION["num_hidden_layers"],
                              heads=VISION["num_attention_heads"],
                              image_size=VISION["image_size"], patch_size=VISION["patch_size"])

    base = hf_vision(seed=1)
    base.save_pretrained(models / "base")
    states = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
    states["ft_a"] = perturbed(states["base"], 11)
    states["ft_b"] = perturbed(states["base"], 12, scale=0.02)  # far enough to tell apart
    states["ft_c"] = perturbed(states["base"], 13)
    for name in ("ft_a", "ft_c"):  # Hugging Face directories
        hf_vision(states[name]).save_pretrained(models / name)
    # The papers' open_clip state dict, every key under `model.`.
    torch.save(hf_to_open_clip(states["ft_b"], "model."), models / "ft_b.pt")
    hf_vision(states["ft_b"]).save_pretrained(models / "ft_b_hf")  # its HF twin

    splits = {task: {s: coloured(n, size=size, seed=seed + i)
                     for i, (s, n) in enumerate(rows.items())}
              for (task, rows), size, seed in zip(ROWS.items(), (32, 24, 40), (100, 200, 300))}
    data = root / "data"
    write_hf_parquet(data / "a", splits["alpha"], CLASSES, shards=2, row_group_size=8)
    write_save_to_disk(data / "b", splits["beta"], CLASSES, shards=2, batch_size=7)
    write_image_folder(data / "c", splits["gamma"], CLASSES, image_format="JPEG")

    heads = root / "heads"
    heads.mkdir()
    head_a = prototypes(base, splits["alpha"]["train"])
    head_b = prototypes(base, splits["beta"]["train"])
    save_authors_head(heads / "head_A.pt", head_a)
    save_file({"weight": head_a, "bias": torch.zeros(len(CLASSES))},
              str(heads / "head_A.safetensors"), {"normalize": "true"})
    save_file({"weight": head_b}, str(heads / "b.safetensors"))

    tasks: list[dict[str, Any]] = [
        {"name": "alpha", "data": "data/a", "head": "heads/head_A.pt",
         "finetuned": "models/ft_a"},
        {"name": "beta", "data": {"location": "data/b", "format": "arrow"},
         "splits": {"test": "test", "validation": "validation"},
         "head": "heads/b.safetensors", "finetuned": "models/ft_b.pt"},
        {"name": "gamma", "data": "data/c",
         "head": {"zero_shot": {"templates": TEMPLATES, "clip": "models/clip"}},
         "finetuned": "models/ft_c", "finetuned_accuracy": GAMMA_FINETUNED},
    ]
    values = {"base": "models/base", "tasks": tasks}
    manifest = write_yaml(root / "m.yaml", values)
    safetensors_head = {**values, "tasks": [{**tasks[0], "head": "heads/head_A.safetensors"},
                                            *tasks[1:]]}
    return {"root": root, "manifest": manifest, "values": values,
            "manifest_st": write_yaml(root / "m_safetensors.yaml", safetensors_head),
            "clip": clip, "states": states, "splits": splits,
            "heads": {"alpha": head_a, "beta": head_b}}


def _tasks(user, **changes: dict[str, Any]) -> list[dict[str, Any]]:
    """The user manifest's tasks, with some fields of some tasks changed (None: removed)."""
    out = []
    for task in user["values"]["tasks"]:
        task = {**task, **changes.get(task["name"], {})}
        out.append({k: v for k, v in task.items() if v is not None})
    return out


def _manifest(user, name: str, tasks: list[dict[str, Any]], **top: Any) -> str:
    """A manifest next to the user's data (so relative paths still resolve)."""
    return write_yaml(user["root"] / name, {**user["values"], **top, "tasks": tasks})


def test_user_manifest_evaluates_through_the_cli(user, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, stdout, err = cli(capsys, ["evaluate", "--tasks-file", user["manifest"], "--json",
                                     str(out), "--engine", "local"])
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["manifest_digest"] == sha256_of(user["manifest"])
    assert result["manifest"] == user["manifest"]
    assert set(result["accuracy"]) == set(ROWS)
    for task, accuracy in result["accuracy"].items():
        assert 0.0 <= accuracy <= 1.0
        correct = accuracy * ROWS[task]["test"]  # a count out of the test rows
        assert abs(correct - round(correct)) < 1e-9, (task, accuracy)
    assert result["absolute"] == pytest.approx(sum(result["accuracy"].values()) / 3)
    # Every task has a fine-tuned checkpoint: the normalised accuracy is reported.
    assert set(result["finetuned"]) == set(ROWS) and result["normalized"] is not None
    assert result["finetuned"]["gamma"] == GAMMA_FINETUNED["test"]  # stated, not evaluated
    assert "alpha" in stdout and "gamma" in stdout


def test_user_manifest_counts_equal_an_independent_reference(user):
    """The pool's counts, every row present, equal transformers' own model on pixels decoded
    here: parquet + the papers' pickled head on theta_0, save_to_disk (resized from 24 px) +
    a safetensors head on the open_clip `.pt` fine-tune."""
    task_set = open_task_set(tasks_file=user["manifest"], log=quiet)
    assert task_set.task_names == list(ROWS)
    assert task_set.base == str(user["root"] / "models" / "base")
    pool = task_set.pool("local", None, "cpu", None)
    ft_b = str(user["root"] / "models" / "ft_b.pt")
    requests = [(w, t, s) for w in (Weights.base(), Weights.model(ft_b)) for t in ROWS
                for s in SPLITS]
    counts = dict(zip(requests, pool.counts(requests)))
    val_rows = {"alpha": PAPERS_VAL, "beta": ROWS["beta"]["validation"], "gamma": PAPERS_VAL}
    for (_, task, split), (correct, total) in counts.items():
        assert total == (ROWS[task]["test"] if split == "test" else val_rows[task])
        assert 0 <= correct <= total

    splits = user["splits"]
    for task, state, weights, head_bias in (
            ("alpha", "base", Weights.base(), torch.zeros(len(CLASSES))),
            ("beta", "ft_b", Weights.model(ft_b), None)):
        images = [im for im, _ in splits[task]["test"]]
        labels = np.array([label for _, label in splits[task]["test"]])
        expected = reference_counts(hf_vision(user["states"][state]), clip_pixels(images),
                                    labels, user["heads"][task], head_bias)
        assert counts[(weights, task, "test")] == (expected, len(labels)), task
    # The open_clip fine-tune is told apart from theta_0 (a mis-mapped key would not be hidden).
    assert counts[(Weights.model(ft_b), "beta", "test")] != \
        counts[(Weights.base(), "beta", "test")]


def test_papers_validation_rows_are_random_splits_second_subset(user):
    loaded = load_manifest(user["manifest"])
    task = resolve_task(loaded.manifest, loaded.manifest.tasks[0])
    n_train = ROWS["alpha"]["train"]
    v = int(n_train * 0.1)
    _, held_out = random_split(TensorDataset(torch.arange(n_train)), [n_train - v, v],
                               generator=torch.Generator().manual_seed(0))
    assert task.splits["val"].rows is not None
    assert task.splits["val"].rows.tolist() == sorted(held_out.indices)
    assert task.splits["val"].source.num_rows == n_train  # drawn from train, not test
    assert task.splits["test"].rows is None and task.splits["test"].num_rows == 30
    # Task beta names its validation split: all of it, no draw.
    beta = resolve_task(loaded.manifest, loaded.manifest.tasks[1])
    assert beta.splits["val"].rows is None
    assert beta.splits["val"].num_rows == ROWS["beta"]["validation"]


def test_pickled_head_and_its_safetensors_twin_give_identical_counts(user):
    with pytest.raises(ModuleNotFoundError):  # the authors' code is not importable here
        torch.load(user["root"] / "heads" / "head_A.pt", weights_only=False)
    pickled = open_task_set(tasks_file=user["manifest"], log=quiet)
    twin = open_task_set(tasks_file=user["manifest_st"], log=quiet)
    assert pickled.manifest.digest != twin.manifest.digest
    a, b = pickled.tasks[0].head, twin.tasks[0].head
    assert torch.equal(a.weight, user["heads"]["alpha"]) and torch.equal(a.weight, b.weight)
    assert a.bias is not None and b.bias is not None and torch.equal(a.bias, b.bias)
    assert a.normalize and b.normalize
    requests = [(w, "alpha", s) for w in (Weights.base(),
                                          Weights.model(str(user["root"] / "models" / "ft_a")))
                for s in SPLITS]
    got = [ts.pool("local", None, "cpu", None).counts(requests) for ts in (pickled, twin)]
    assert got[0] == got[1]
    assert [t for _, t in got[0]] == [PAPERS_VAL, 30, PAPERS_VAL, 30]


def test_finetuned_override_count_mismatch_is_one_line(user, capsys):
    ft = str(user["root"] / "models" / "ft_a")
    code, _, err = cli(capsys, ["evaluate", "--tasks-file", user["manifest"], "--finetuned",
                                ft, ft, "--engine", "local"])
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --finetuned"), err
    assert "2 checkpoint(s) for 3 task(s)" in lines[0]
    assert all(name in lines[0] for name in ROWS)


@pytest.fixture(scope="module")
def bench_run(user, tmp_path_factory):
    """One `bench` on the user's manifest (fine-tuned checkpoints given as HF directories),
    recorded in a history."""
    work = tmp_path_factory.mktemp("bench")
    models = user["root"] / "models"
    argv = ["bench", "--tasks-file", user["manifest"], "--methods", "task_arithmetic,tsv_m",
            "--out", str(work / "out"), "--history", str(work / "history"), "--engine",
            "local", "--finetuned", *(str(models / n) for n in ("ft_a", "ft_b_hf", "ft_c"))]
    code = main(argv)
    return {"code": code, "out": work / "out", "history": str(work / "history")}


def test_bench_on_a_user_manifest(user, bench_run):
    assert bench_run["code"] == 0
    summary = json.loads((bench_run["out"] / "summary.json").read_text())
    assert summary["tasks"] == list(ROWS) and summary["num_tasks"] == 3
    assert summary["manifest_digest"] == sha256_of(user["manifest"])
    assert summary["suite"] == "m" and summary["suite_dir"] == user["manifest"]
    assert set(summary["rows"]) == {"zero_shot", "finetuned", "task_arithmetic", "tsv_m"}
    for name, row in summary["rows"].items():
        assert set(row["per_task"]) == set(ROWS), name
        for score in row["per_task"].values():
            assert 0.0 <= score["absolute"] <= 1.0
        assert row["absolute"] == pytest.approx(
            sum(s["absolute"] for s in row["per_task"].values()) / 3)
    assert summary["rows"]["finetuned"]["normalized"] == pytest.approx(1.0)
    assert summary["rows"]["finetuned"]["per_task"]["gamma"]["absolute"] == \
        GAMMA_FINETUNED["test"]
    assert summary["rows"]["tsv_m"]["alpha"] is not None
    for name in ("summary.json", "summary.parquet", "summary.md"):
        assert (bench_run["out"] / name).is_file()


def test_bench_with_mixed_checkpoint_layouts(user, tmp_path, capsys):
    """HF and open_clip fine-tunes in one manifest: merged from canonical copies, which are
    removed afterwards; the merge equals the one from HF twins of the same weights."""
    runs = {}
    for name, extra in (("mixed", []), ("hf", ["--finetuned", *(
            str(user["root"] / "models" / n) for n in ("ft_a", "ft_b_hf", "ft_c"))])):
        out = tmp_path / name
        code, _, err = cli(capsys, ["bench", "--tasks-file", user["manifest"], "--methods",
                                    "task_arithmetic", "--out", str(out), "--engine", "local",
                                    *extra])
        assert code == 0, err
        assert not (out / "inputs").exists()
        runs[name] = json.loads((out / "summary.json").read_text())["rows"]["task_arithmetic"]
    assert runs["mixed"] == runs["hf"]


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_zero_finetuned_accuracy_is_not_a_traceback(user, tmp_path, capsys, command):
    # A head that always answers class 0, on data without class 0: every model scores 0.
    head = tmp_path / "always0.safetensors"
    save_file({"weight": torch.zeros(3, VISION["projection_dim"]),
               "bias": torch.tensor([10.0, 0.0, 0.0])}, str(head))
    never0 = [(im, 1 + i % 2) for i, (im, _) in enumerate(coloured(50, 32, 7))]
    data = tmp_path / "never0"
    write_hf_parquet(data, {"train": never0, "test": never0[:20]}, CLASSES, shards=1)
    manifest = _manifest(user, f"zero_{command}.yaml",
                         _tasks(user, alpha={"data": str(data), "head": str(head)}))
    argv = [command, "--tasks-file", manifest, "--engine", "local"]
    if command == "bench":
        argv += ["--methods", "task_arithmetic", "--out", str(tmp_path / "out"), "--finetuned",
                 *(str(user["root"] / "models" / n) for n in ("ft_a", "ft_b_hf", "ft_c"))]
    code, out, err = cli(capsys, argv)
    if command == "evaluate":  # accuracies, without the undefined normalised one
        assert code == 0 and "normalized" not in out, err
    else:
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and "task 'alpha'" in lines[0], err


# ---- 3. Ray ------------------------------------------------------------------------------------

def test_ray_pool_through_a_manifest_equals_in_process(user, ray_cluster):
    task_set = open_task_set(tasks_file=user["manifest"], log=quiet)
    models = user["root"] / "models"
    requests = [(w, t, s) for w in (Weights.base(), Weights.model(str(models / "ft_b.pt")),
                                    Weights.model(str(models / "ft_c")))
                for t in ROWS for s in SPLITS]
    expected = task_set.pool("local", None, "cpu", None).counts(requests)
    pool = EvaluationPool(task_set.base, task_set.tasks, "ray", workers=2, device="cpu",
                          preprocess=task_set.manifest.manifest.preprocess)
    try:
        assert pool.workers == 2
        assert len(set(pool.actor_pids())) == 2 and os.getpid() not in pool.actor_pids()
        assert pool.counts(requests) == expected
    finally:
        pool.close()


# ---- 4. one-line errors ------------------------------------------------------------------------

def test_bad_yaml_is_one_line_naming_the_file(user, capsys):
    path = user["root"] / "bad.yaml"
    path.write_text("tasks:\n  - name: alpha\n    data: data/a\n    head: [heads/a.pt\n")
    line = assert_one_line_error(capsys, str(path), str(path))
    assert "not a valid YAML" in line


@pytest.mark.parametrize("case,changes,top,expected", [
    ("unknown_field", {"beta": {"colour": "red"}}, {}, ["task 'beta'", "colour",
                                                        "unknown field"]),
    ("missing_head", {"gamma": {"head": None}}, {}, ["task 'gamma'", "head", "required"]),
    ("percent_accuracy", {"alpha": {"finetuned_accuracy": {"validation": 79.2, "test": 0.78}}},
     {}, ["task 'alpha'", "finetuned_accuracy"]),
])
def test_malformed_manifest_is_one_line_naming_task_and_file(user, capsys, case, changes, top,
                                                            expected):
    manifest = _manifest(user, f"{case}.yaml", _tasks(user, **changes), **top)
    assert_one_line_error(capsys, manifest, manifest, *expected)


def test_duplicate_task_names_are_one_line(user, capsys):
    tasks = _tasks(user)
    manifest = _manifest(user, "dup.yaml", [*tasks, {**tasks[1], "name": "alpha"}])
    line = assert_one_line_error(capsys, manifest, manifest, "'alpha'")
    assert "twice" in line


def test_missing_split_is_one_line(user, capsys):
    manifest = _manifest(user, "nosplit.yaml", _tasks(user, alpha={"splits": {"test": "nope"}}))
    line = assert_one_line_error(capsys, manifest, "task 'alpha'",
                                 str(user["root"] / "data" / "a"), "'nope'")
    assert "test, train" in line  # what it has


def test_head_class_count_differs_from_the_labels(user, tmp_path, capsys):
    head = tmp_path / "four.safetensors"
    save_file({"weight": torch.randn(4, VISION["projection_dim"])}, str(head))
    manifest = _manifest(user, "four.yaml", _tasks(user, beta={"head": str(head)}))
    line = assert_one_line_error(capsys, manifest, "task 'beta'", str(head))
    assert "4 classes" in line and "has 3" in line


def test_head_dim_differs_from_the_projection(user, tmp_path, capsys):
    head = tmp_path / "narrow.safetensors"
    save_file({"weight": torch.randn(3, 8)}, str(head))
    manifest = _manifest(user, "narrow.yaml", _tasks(user, beta={"head": str(head)}))
    line = assert_one_line_error(capsys, manifest, "task 'beta'", str(head))
    assert "8-dim" in line and f"makes {VISION['projection_dim']}" in line
    # On Ray the driver checks the heads from the base's headers, before any actor starts
    # (an actor's constructor failing would surface as a dead actor, not this line).
    task_set = open_task_set(tasks_file=manifest, log=quiet)
    with pytest.raises(InputError, match=r"task 'beta': .*narrow\.safetensors: the head takes "
                                         r"8-dim embeddings"):
        EvaluationPool(task_set.base, task_set.tasks, "ray", address="127.0.0.1:1")


def _corrupt_parquet_row(directory: Path, split: str, row: int) -> tuple[str, int]:
    """Replace one image's bytes in the split's first parquet shard by junk; returns the
    file and the row within it."""
    file = sorted((directory / "data").glob(f"{split}-*.parquet"))[0]
    table = pq.read_table(file)
    rows = table.to_pylist()
    rows[row]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": "junk.png"}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file, row_group_size=8)
    return str(file), row


def test_corrupt_parquet_image_names_task_file_and_row(user, tmp_path, capsys):
    data = tmp_path / "a"
    shutil.copytree(user["root"] / "data" / "a", data)
    file, row = _corrupt_parquet_row(data, "test", 11)
    manifest = _manifest(user, "corrupt_pq.yaml", _tasks(user, alpha={"data": str(data)}))
    line = assert_one_line_error(capsys, manifest, "task 'alpha'", f"{file} row {row}")
    assert "cannot decode image" in line


def test_truncated_jpeg_names_task_and_image(user, tmp_path, capsys):
    data = tmp_path / "c"
    shutil.copytree(user["root"] / "data" / "c", data)
    victim = sorted((data / "test" / "dog").iterdir())[1]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    manifest = _manifest(user, "truncated.yaml", _tasks(user, gamma={"data": str(data)}))
    line = assert_one_line_error(capsys, manifest, "task 'gamma'", str(victim))
    assert "cannot decode image" in line


def test_label_outside_the_heads_classes(user, tmp_path, capsys):
    samples = labelled(12, len(CLASSES), size=32, seed=9)
    samples[7] = (samples[7][0], 5)
    data = tmp_path / "labels"
    write_hf_parquet(data, {"train": labelled(20, 3, 32, 8), "test": samples}, CLASSES,
                     shards=1, layout="root")
    manifest = _manifest(user, "labels.yaml", _tasks(user, alpha={"data": str(data)}))
    line = assert_one_line_error(capsys, manifest, "task 'alpha'",
                                 str(data / "test-00000-of-00001.parquet") + " row 7")
    assert "label 5" in line and "3 classes" in line


def test_pickle_payload_is_refused_and_never_runs(user, tmp_path, capsys):
    marker = tmp_path / "pwned"
    head = tmp_path / "head_evil.pt"
    torch.save(_Payload(f"touch {marker}"), head)
    manifest = _manifest(user, "evil.yaml", _tasks(user, alpha={"head": str(head)}))
    line = assert_one_line_error(capsys, manifest, "task 'alpha'", str(head))
    assert "system" in line and "refusing" in line
    assert not marker.exists()


def test_head_with_a_nested_object_is_refused(user, tmp_path, capsys):
    head = tmp_path / "head_extra.pt"
    save_authors_head(head, torch.randn(3, VISION["projection_dim"]), extra=True)
    manifest = _manifest(user, "extra.yaml", _tasks(user, alpha={"head": str(head)}))
    line = assert_one_line_error(capsys, manifest, "task 'alpha'", str(head))
    assert f"{AUTHORS_MODULE}.Extra" in line


# ---- 5. history ---------------------------------------------------------------------------------

def test_bench_history_rows_carry_the_manifest_digest(user, bench_run):
    from pipeline.history.store import read_history
    assert bench_run["code"] == 0
    rows = read_history(bench_run["history"]).to_pylist()
    assert rows and {r["kind"] for r in rows} == {"bench"}
    assert {r["manifest_digest"] for r in rows} == {sha256_of(user["manifest"])}
    assert {r["task"] for r in rows} == {*ROWS, "mean"}
    assert {r["method"] for r in rows} == {"zero_shot", "finetuned", "task_arithmetic",
                                           "tsv_m"}


def test_different_manifests_have_different_digests(user, tmp_path):
    same = tmp_path / "copy.yaml"
    shutil.copy(user["manifest"], same)
    changed = tmp_path / "changed.yaml"
    changed.write_bytes(Path(user["manifest"]).read_bytes() + b"# another night's data\n")
    digests = [load_manifest(str(p)).digest for p in (user["manifest"], same, changed)]
    assert digests[0] == digests[1] == sha256_of(user["manifest"])
    assert digests[2] == sha256_of(str(changed)) != digests[0]


def _history_row(run: str, day: int, digest: str, normalized: float) -> dict[str, Any]:
    return {"run_id": run, "timestamp": dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc),
            "kind": "bench", "git_commit": "c", "hardware": "h", "method": "tsv_m",
            "params": "{}", "suite": "m", "manifest_digest": digest, "model": "models",
            "task": "mean", "num_tasks": 3, "split": "test", "accuracy": normalized,
            "normalized_accuracy": normalized}


@pytest.mark.parametrize("same_data", [True, False])
def test_regressions_never_compare_runs_on_different_data(tmp_path, same_data):
    from pipeline.history.regressions import Thresholds, detect_regressions
    from pipeline.history.store import append_run, read_history
    history = str(tmp_path / "history")
    earlier, tonight = "a" * 64, ("a" if same_data else "b") * 64
    for day in (1, 2, 3):
        append_run(history, [_history_row(f"run{day}", day, earlier, 0.90)])
    append_run(history, [_history_row("run4", 4, tonight, 0.50)])
    found = detect_regressions(read_history(history), "run4", Thresholds())
    if same_data:
        assert len(found) == 1
        assert found[0].current == pytest.approx(0.50)
        assert found[0].baseline == pytest.approx(0.90) and found[0].baseline_runs == 3
    else:
        assert found == []


# ---- FusionBench's layout: a full CLIPModel base, CLIPVisionModel fine-tunes ------------------

def test_fusionbench_layout_benches_with_the_base_projection(tmp_path, capsys):
    """The base is a full CLIPModel (text tower, projections), the fine-tunes are
    CLIPVisionModels saved by transformers (no projection, no `vision_model.` prefix): they
    evaluate and merge as the base's vision tower fine-tuned, keeping the base's projection."""
    from transformers import CLIPModel, CLIPVisionModel

    from pipeline.evaluation.evaluator import Evaluator
    from pipeline.models.weights import Weights as W

    clip_dir = make_tiny_clip_dir(tmp_path / "clip", projection_dim=16, hidden_size=64,
                                  layers=2, heads=1, image_size=32, patch_size=8,
                                  preprocessor=False)
    base = CLIPModel.from_pretrained(clip_dir).eval()
    tunes = []
    for i in range(2):
        tuned = CLIPVisionModel(base.config.vision_config).eval()
        # transformers 5's CLIPVisionModel holds the tower's modules itself (no prefix).
        tuned.load_state_dict(perturbed(base.vision_model.state_dict(), seed=10 + i,
                                        scale=0.02))
        tuned.save_pretrained(tmp_path / f"ft{i}")
        tunes.append(tuned)
    samples = coloured(40, 32, seed=3)
    data = tmp_path / "data"
    write_hf_parquet(data, {"train": samples, "test": samples[:20]}, CLASSES, shards=1)
    manifest = write_yaml(tmp_path / "fb.yaml", {
        "base": clip_dir, "clip": clip_dir, "templates": ["a photo of a {}."],
        "preprocess": "clip",
        "tasks": [{"name": f"t{i}", "data": str(data), "head": {"zero_shot": {}},
                   "finetuned": str(tmp_path / f"ft{i}")} for i in range(2)]})
    code, _, err = cli(capsys, ["bench", "--tasks-file", manifest, "--methods",
                                "task_arithmetic,tsv_m", "--out", str(tmp_path / "out"),
                                "--engine", "local"])
    assert code == 0, err
    # The fine-tuned model as the evaluator sees it: the base CLIPModel with this vision tower.
    evaluator = Evaluator(clip_dir)
    evaluator.set_weights(W.model(str(tmp_path / "ft0")))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base.vision_model.load_state_dict(tunes[0].state_dict())
        expected = base.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)
        torch.testing.assert_close(evaluator.model.embed(pixels), expected)


def test_several_decoding_threads_count_what_one_counts(user):
    """GPU evaluators decode with several threads (the model outruns one): same batches, same
    counts, in the same order."""
    from pipeline.evaluation.evaluator import Evaluator, RowRange

    task_set = open_task_set(tasks_file=user["manifest"], log=quiet)
    tasks = {t.name: t for t in task_set.tasks}
    counts = []
    for threads in (1, 4):
        evaluator = Evaluator(task_set.base, tasks, "clip", decode_threads=threads)
        counts.append([evaluator.count(Weights.base(), RowRange(t, s, 0, 10 ** 6))
                       for t in tasks for s in ("val", "test")])
    assert counts[0] == counts[1] and sum(c for c, _ in counts[0]) > 0


def test_nightly_benchmarks_a_manifest_and_records_its_digest(user, tmp_path):
    """`tasks_files` alone (no suites): one cell named after the manifest, its rows carrying
    the manifest's digest."""
    from pipeline.history.nightly import NightlyConfig, run_nightly
    from pipeline.history.store import read_history

    config = NightlyConfig(history=str(tmp_path / "history"), report=str(tmp_path / "r.html"),
                           work_dir=str(tmp_path / "work"), tasks_files=[user["manifest"]],
                           task_counts=[2], methods=["task_arithmetic"], engine="local")
    assert config.suites == []
    result = run_nightly(config, log=quiet)
    assert result.exit_code == 0 and [c["cell"] for c in result.cells] == [
        f"{os.path.splitext(os.path.basename(user['manifest']))[0]}-T2"]
    rows = read_history(str(tmp_path / "history")).to_pylist()
    assert rows and {r["manifest_digest"] for r in rows} == {sha256_of(user["manifest"])}


@pytest.mark.parametrize("command", ["evaluate", "bench"])
def test_suite_and_tasks_file_together_are_one_line(user, tmp_path, capsys, command):
    argv = [command, "--suite", "tiny", "--tasks-file", user["manifest"], "--engine", "local"]
    code, _, err = cli(capsys, argv + (["--out", str(tmp_path / "o")] if command == "bench"
                                       else []))
    assert code == 2 and err.strip().splitlines() == [
        "error: give --suite or --tasks-file, not both"]
    assert not (tmp_path / "o").exists()


def test_a_suite_directory_from_an_older_version_is_one_line(tmp_path, capsys):
    (tmp_path / "suite.json").write_text("{}")
    code, _, err = cli(capsys, ["evaluate", "--suite", str(tmp_path), "--engine", "local"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "built by an older version" in err and str(tmp_path) in err
