"""Bad input gets a clear one-line error, exit code 2, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from pipeline.io import open_checkpoint, write_safetensors
from pipeline.cli.main import main


def write_model(directory, weights):
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights)
    return str(directory)


def weights(seed=0, **changes):
    g = torch.Generator().manual_seed(seed)
    w = {"enc.layers.0.fc.weight": torch.randn(12, 8, generator=g),
         "enc.layers.0.fc.bias": torch.randn(12, generator=g),
         "enc.layers.1.fc.weight": torch.randn(12, 8, generator=g),
         "enc.steps": torch.tensor(7)}
    w.update(changes)
    return {k: v for k, v in w.items() if v is not None}


@pytest.fixture
def inputs(tmp_path):
    base = write_model(tmp_path / "base", weights(0))
    tasks = [write_model(tmp_path / f"t{i}", weights(i)) for i in (1, 2)]
    return tmp_path, base, tasks


def run(capsys, *argv):
    code = main(["merge", "--engine", "local", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_nothing_left(parent, out="out"):
    assert not os.path.exists(os.path.join(parent, out))
    assert not [p for p in os.listdir(parent) if ".merge-staging-" in p]


BAD_TASKS = {
    "missing key": (dict(**{"enc.layers.1.fc.weight": None}), "missing key 'enc.layers.1.fc.weight'"),
    "extra key": (dict(extra=torch.ones(2)), "extra key 'extra'"),
    "shape": (dict(**{"enc.layers.0.fc.bias": torch.ones(13)}), "shape [13]"),
    "dtype": (dict(**{"enc.layers.0.fc.bias": torch.ones(12, dtype=torch.int64)}), "dtype I64"),
    "nan": (dict(**{"enc.layers.0.fc.weight": torch.full((12, 8), float("nan"))}),
            "'enc.layers.0.fc.weight' contains NaN or Inf"),
    "inf": (dict(**{"enc.layers.0.fc.bias": torch.full((12,), float("inf"))}),
            "'enc.layers.0.fc.bias' contains NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_checkpoints(case, inputs, capsys):
    tmp, base, tasks = inputs
    changes, message = BAD_TASKS[case]
    bad = write_model(tmp / "bad", weights(3, **changes))
    code, err = run(capsys, "--base", base, "--finetuned", tasks[0], bad, "--method", "iso_c",
                    "--alpha", "1", "--out", str(tmp / "out"))
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert message in err and "bad" in err, err
    assert_nothing_left(tmp)


def test_truncated_file(inputs, capsys):
    tmp, base, tasks = inputs
    path = os.path.join(tasks[1], "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    code, err = run(capsys, "--base", base, "--finetuned", *tasks, "--method", "tsv_m",
                    "--alpha", "1", "--out", str(tmp / "out"))
    assert code == 2 and "truncated" in err and path in err
    assert_nothing_left(tmp)


@pytest.mark.parametrize("argv,message", [
    (["--finetuned", "{tmp}/nope"], "does not exist"),
    (["--method", "iso_d"], "unknown method 'iso_d'"),
    (["--finetuned", "{t0}", "{t0}"], "given twice"),
    (["--out", "{t0}/merged"], "overlaps the input"),
    (["--alpha", "0"], "--alpha = '0': must be a finite number > 0"),
    (["--alpha", "-2"], "--alpha = '-2': must be a finite number > 0"),
    (["--alpha", "inf"], "--alpha = 'inf': must be a finite number > 0"),
    (["--param", "fraction=0.5"], "no parameter(s) ['fraction']"),
    (["--param", "common_space_fraction=1.5"], "must be in (0, 1)"),
    (["--method", "ties", "--param", "k=0"], "must be in (0, 100]"),
    (["--param", "oops"], "name=value"),
    (["--max-shard-size", "lots"], "not a size"),
    (["--method", "average"], "fixes alpha"),
])
def test_bad_options(argv, message, inputs, capsys):
    tmp, base, tasks = inputs
    defaults = {"--finetuned": tasks, "--method": ["iso_cts"], "--alpha": ["1"],
                "--out": [str(tmp / "out")]}
    given = [a.format(tmp=tmp, t0=tasks[0]) for a in argv]
    for flag, values in defaults.items():
        if flag not in given:
            given += [flag, *values]
    code, err = run(capsys, "--base", base, *given)
    assert code == 2, err
    assert message in err, err
    assert_nothing_left(tmp)
    assert_nothing_left(tasks[0], "merged")


def test_zero_tasks(inputs, capsys):
    tmp, base, _ = inputs
    code, err = run(capsys, "--base", base, "--method", "iso_c", "--alpha", "1",
                    "--out", str(tmp / "out"))
    assert code == 2 and err == "error: --finetuned: is required"
    with pytest.raises(SystemExit) as exit_:  # argparse: --finetuned with no value
        main(["merge", "--base", base, "--finetuned", "--method", "iso_c", "--out", "x"])
    assert exit_.value.code == 2
    assert_nothing_left(tmp)


def test_existing_output_is_refused_unless_overwrite(inputs, capsys):
    tmp, base, tasks = inputs
    argv = ["--base", base, "--finetuned", *tasks, "--method", "iso_c", "--alpha", "1",
            "--out", str(tmp / "out")]
    assert run(capsys, *argv)[0] == 0
    first = (tmp / "out" / "merge_report.json").read_text()
    code, err = run(capsys, *argv)
    assert code == 2 and "already exists" in err
    assert (tmp / "out" / "merge_report.json").read_text() == first
    code, _ = run(capsys, *argv, "--overwrite")  # a previous output of ours is replaced
    assert code == 0 and (tmp / "out" / "merge_report.json").read_text() != first
    assert (tmp / "out" / "model.safetensors.index.json").exists()  # 3 layer groups


def test_yaml_config_and_flag_overrides(inputs, capsys):
    tmp, base, tasks = inputs
    cfg = tmp / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": base, "finetuned": tasks, "method": "iso_cts",
                                   "alpha": 0.7, "params": {"common_space_fraction": 0.5},
                                   "out": str(tmp / "from-yaml"), "compute-dtype": "float64"}))
    code = main(["merge", "--config", str(cfg), "--engine", "local", "--alpha", "1.5",
                 "--param", "common_space_fraction=0.6"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp / "from-yaml" / "merge_report.json").read_text())
    assert report["alpha"] == 1.5 and report["params"] == {"common_space_fraction": 0.6}
    assert report["options"]["compute_dtype"] == "float64"
    cfg.write_text(yaml.safe_dump({"base": base, "bogus": 1}))
    assert main(["merge", "--config", str(cfg)]) == 2
    assert "bogus: unknown option" in capsys.readouterr().err


def test_report_config_copy_and_integer_buffers(inputs, capsys):
    tmp, base, tasks = inputs
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"model_type": "toy"}, f)
    code, _ = run(capsys, "--base", base, "--finetuned", *tasks, "--method", "ties",
                  "--alpha", "0.5", "--out", str(tmp / "out"))
    assert code == 0
    out = tmp / "out"
    assert json.loads((out / "config.json").read_text()) == {"model_type": "toy"}
    report = json.loads((out / "merge_report.json").read_text())
    import hashlib
    import struct
    task_file = report["inputs"]["finetuned"][0]["files"][0]
    raw = open(task_file["path"], "rb").read()  # header, then each tensor's sha256 in order
    end = 8 + struct.unpack("<Q", raw[:8])[0]
    spans = sorted(v["data_offsets"] for k, v in json.loads(raw[8:end]).items()
                   if k != "__metadata__")
    digest = hashlib.sha256(raw[:end])
    for a, b in spans:
        digest.update(hashlib.sha256(raw[end + a:end + b]).digest())
    assert task_file["tensor_sha256"] == digest.hexdigest()
    assert report["inputs"]["base"]["size"] == os.path.getsize(os.path.join(base, "model.safetensors"))
    assert {"torch", "safetensors", "pyarrow", "python"} <= set(report["versions"])
    assert report["timings_s"]["total"] > 0 and report["params"] == {"k": 20.0, "merge_func": "mean"}
    with open_checkpoint(str(out)) as merged:
        assert torch.equal(merged.read("enc.steps"), torch.tensor(7)), "int buffer from the base"


def test_task_vector_output_rescales_to_the_model(inputs, capsys):
    tmp, base, tasks = inputs
    common = ["--base", base, "--finetuned", *tasks, "--method", "tsv_m"]
    assert run(capsys, *common, "--alpha", "0.8", "--out", str(tmp / "model"))[0] == 0
    assert run(capsys, *common, "--output", "task_vector", "--out", str(tmp / "tv"))[0] == 0
    with open_checkpoint(str(tmp / "model")) as model, open_checkpoint(str(tmp / "tv")) as tv, \
            open_checkpoint(base) as theta0:
        assert "enc.steps" not in tv.keys()
        for key in tv.keys():
            assert torch.allclose(theta0.read(key) + 0.8 * tv.read(key), model.read(key),
                                  atol=1e-6), key


def test_tsv_c_artefact_expands_to_a_task_model(inputs, capsys):
    tmp, base, tasks = inputs
    assert run(capsys, "--base", base, "--finetuned", *tasks, "--method", "tsv_c",
               "--out", str(tmp / "art"))[0] == 0
    assert main(["expand", "--artefact", str(tmp / "art"), "--base", base, "--task", "1",
                 "--out", str(tmp / "task1")]) == 0
    with open_checkpoint(str(tmp / "task1")) as got, open_checkpoint(base) as b, \
            open_checkpoint(tasks[1]) as t:
        for key in b.keys():
            delta = t.read(key).double() - b.read(key).double()
            if delta.dim() == 2:
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(delta.shape) // 2
                delta = (u[:, :k] * s[:k]) @ vh[:k]
            expected = (b.read(key).double() + delta).to(b.read(key).dtype)
            assert torch.allclose(got.read(key).double(), expected.double(), atol=1e-5), key
    assert main(["expand", "--artefact", str(tmp / "art"), "--base", base, "--task", "5",
                 "--out", str(tmp / "task5")]) == 2
    assert not (tmp / "task5").exists()
    shutil.rmtree(tmp / "task1")
