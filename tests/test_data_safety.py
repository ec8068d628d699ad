"""No mistake a user can make loses data or claims a write that did not happen (issue 14).

Each test is one way a user can get an output location, an option or a verification wrong;
each must end in one clear line and exit 2 (or 1 for a damaged output in `verify`), with the
user's files untouched and nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from pipeline.io import open_checkpoint, write_safetensors
from pipeline.io import safetensors_io
from pipeline.cli.main import main
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import OutputConflictError
from pipeline.runtime.executors import LocalExecutor


def _weights(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = {"enc.layers.0.fc.weight": torch.randn(12, 8, generator=g),
         "enc.layers.0.fc.bias": torch.randn(12, generator=g),
         "enc.layers.1.fc.weight": torch.randn(12, 8, generator=g),
         "head.proj.weight": torch.randn(6, 12, generator=g)}
    out = {k: v.to(dtype) for k, v in w.items()}
    out["enc.steps"] = torch.tensor(7)
    return out


def _model(directory, seed, dtype=torch.float32, config=True):
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), _weights(seed, dtype))
    if config:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"model_type": "toy", "seed": seed}, f)
    return str(directory)


@pytest.fixture
def inputs(tmp_path):
    base = _model(tmp_path / "base", 0)
    tasks = [_model(tmp_path / f"t{i}", i) for i in (1, 2)]
    return tmp_path, base, tasks


def _merge(capsys, *argv):
    code = main(["merge", "--engine", "local", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def _argv(base, tasks, out, *extra, method="iso_cts"):
    return ["--base", base, "--finetuned", *tasks, "--method", method, "--alpha", "1",
            "--out", str(out), *extra]


def _one_line_error(code, err, expected_code=2):
    assert code == expected_code, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor byte is read: the check must come before the input scan."""
    def refuse(self, key):
        raise AssertionError(f"tensor {key!r} was read before the output was checked")
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", refuse)


# -- 1. URI outputs --------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["s3:bucket/x", "s3:/bucket/x", "S3:/bucket/x", "s3://bucket",
                                 "s3://bucket/", "s3://bucket/x?region=eu-west-1",
                                 "nosuchscheme://b/merged", "file://otherhost/tmp/x"])
def test_malformed_or_unsupported_uri_out_is_refused_before_anything(
        out, inputs, capsys, monkeypatch, no_tensor_reads):
    """Object-store outputs are tested against a real S3 server in test_object_store.py; these
    spellings are refused in one line, before any input byte, and never become a local folder
    called `s3:`."""
    tmp, base, tasks = inputs
    monkeypatch.chdir(tmp)
    before = sorted(os.listdir(tmp))
    code, err, _ = _merge(capsys, *_argv(base, tasks, out))
    _one_line_error(code, err)
    assert "--out" in err and out.rstrip("/").split("?")[0] in err
    assert sorted(os.listdir(tmp)) == before  # no ./s3:/bucket folder
    code = main(["expand", "--artefact", str(tmp), "--base", base, "--task", "0", "--out", out])
    _one_line_error(code, capsys.readouterr().err.strip())
    assert sorted(os.listdir(tmp)) == before


def test_file_uri_out_writes_to_that_local_path(inputs, capsys, monkeypatch):
    tmp, base, tasks = inputs
    monkeypatch.chdir(tmp)
    code, err, out = _merge(capsys, *_argv(base, tasks, f"file://{tmp}/merged"))
    assert code == 0, err
    assert os.path.isfile(tmp / "merged" / "merge_report.json")
    assert not os.path.exists(tmp / "file:")
    assert main(["verify", str(tmp / "merged")]) == 0


# -- 2. two runs, one --out ------------------------------------------------------------------
class _RacingExecutor(LocalExecutor):
    """Runs another complete merge to the same --out while this one is merging."""

    def __init__(self, rival: MergeConfig):
        super().__init__("cpu")
        self.rival = rival

    def imap(self, fn, calls, desc=""):
        if desc.startswith("merge") and self.rival is not None:
            rival, self.rival = self.rival, None
            run_merge(rival)
        return super().imap(fn, calls, desc)


def test_an_output_that_appears_during_the_run_is_never_replaced(inputs):
    tmp, base, tasks = inputs
    out = str(tmp / "out")
    rival = MergeConfig(base=base, finetuned=tasks, method="tsv_m", alpha=1.0, out=out,
                        engine="local")
    mine = MergeConfig(base=base, finetuned=tasks, method="iso_cts", alpha=1.0, out=out,
                       engine="local")
    with pytest.raises(OutputConflictError, match="appeared there while this merge ran"):
        run_merge(mine, executor=_RacingExecutor(rival))
    assert json.loads((tmp / "out" / "merge_report.json").read_text())["method"] == "tsv_m"
    staging = [p for p in os.listdir(tmp) if ".merge-staging-" in p]
    assert len(staging) == 1  # this run's work is kept for --resume
    # The user decides: replace the rival with this merge's kept files, no recompute.
    report = run_merge(mine.model_copy(update={"overwrite": True, "resume": True}))
    assert report.method == "iso_cts" and len(report.resumed_files) == len(
        report.outputs)
    assert main(["verify", out]) == 0


def test_overwrite_at_commit_still_refuses_a_users_folder(inputs):
    tmp, base, tasks = inputs
    out = tmp / "out"

    class UserFolder(LocalExecutor):
        def imap(self, fn, calls, desc=""):
            if desc.startswith("merge") and not out.exists():
                out.mkdir()
                (out / "thesis.tex").write_text("precious")
            return super().imap(fn, calls, desc)

    config = MergeConfig(base=base, finetuned=tasks, method="iso_c", alpha=1.0, out=str(out),
                         engine="local", overwrite=True)
    with pytest.raises(OutputConflictError, match="not an output of merge-pipeline"):
        run_merge(config, executor=UserFolder("cpu"))
    assert (out / "thesis.tex").read_text() == "precious"


# -- 3. --overwrite replaces only our outputs or empty directories ---------------------------
def test_overwrite_refuses_a_folder_of_the_users_files(inputs, capsys, no_tensor_reads):
    tmp, base, tasks = inputs
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("precious")
    (tmp / "mine" / "sub").mkdir()
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "mine", "--overwrite"))
    _one_line_error(code, err)
    assert "not an output of merge-pipeline" in err
    assert (tmp / "mine" / "notes.txt").read_text() == "precious"
    (tmp / "afile").write_text("data")
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "afile", "--overwrite"))
    _one_line_error(code, err)
    assert (tmp / "afile").read_text() == "data"


def test_overwrite_replaces_an_empty_directory_and_a_previous_output(inputs, capsys):
    tmp, base, tasks = inputs
    (tmp / "out").mkdir()
    assert _merge(capsys, *_argv(base, tasks, tmp / "out", "--overwrite"))[0] == 0
    assert _merge(capsys, *_argv(base, tasks, tmp / "out", "--overwrite",
                                 method="tsv_m"))[0] == 0
    assert json.loads((tmp / "out" / "merge_report.json").read_text())["method"] == "tsv_m"
    assert not [p for p in os.listdir(tmp) if ".merge-staging-" in p]


def test_overwrite_through_a_symlink_replaces_the_target_and_leaves_nothing(inputs, capsys):
    tmp, base, tasks = inputs
    assert _merge(capsys, *_argv(base, tasks, tmp / "real"))[0] == 0
    os.symlink(tmp / "real", tmp / "link")
    assert _merge(capsys, *_argv(base, tasks, tmp / "link", "--overwrite",
                                 method="tsv_m"))[0] == 0
    assert os.path.islink(tmp / "link")
    assert json.loads((tmp / "link" / "merge_report.json").read_text())["method"] == "tsv_m"
    assert sorted(p for p in os.listdir(tmp) if p.startswith(".")) == []


def test_expand_follows_the_same_overwrite_rules(inputs, capsys):
    tmp, base, tasks = inputs
    code, err, _ = _merge(capsys, "--base", base, "--finetuned", *tasks, "--method", "tsv_c",
                          "--out", str(tmp / "art"))
    assert code == 0, err
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("precious")
    argv = ["expand", "--artefact", str(tmp / "art"), "--base", base, "--task", "1"]
    assert main([*argv, "--out", str(tmp / "mine"), "--overwrite"]) == 2
    assert (tmp / "mine" / "notes.txt").read_text() == "precious"
    assert main([*argv, "--out", str(tmp / "task1")]) == 0
    assert main([*argv, "--out", str(tmp / "task1"), "--overwrite"]) == 0  # ours: replaced
    assert main(["verify", str(tmp / "task1")]) == 0
    assert main([*argv, "--out", str(tmp / "art" / "inside")]) == 2  # overlaps the artefact


# -- 4. overlap, however it is spelled -------------------------------------------------------
@pytest.mark.parametrize("spelling", ["uri", "relative", "trailing", "symlink", "inside",
                                      "parent"])
def test_output_overlapping_an_input_is_refused_in_every_spelling(spelling, inputs, capsys,
                                                                  monkeypatch, no_tensor_reads):
    tmp, base, tasks = inputs
    monkeypatch.chdir(tmp)
    os.symlink(base, tmp / "base-link")
    base_arg, out = {
        "uri": (f"file://{base}", base),
        "relative": (base, "base"),
        "trailing": (base + "/", "./base/"),
        "symlink": (base, str(tmp / "base-link")),
        "inside": (f"file://{base}", f"{base}/merged"),
        "parent": (base, str(tmp)),
    }[spelling]
    snapshot = sorted(os.listdir(base))
    code, err, _ = _merge(capsys, *_argv(base_arg, tasks, out, "--overwrite"))
    _one_line_error(code, err)
    assert "overlaps the input" in err
    assert sorted(os.listdir(base)) == snapshot


def test_the_same_input_spelled_twice_is_refused(inputs, capsys):
    tmp, base, tasks = inputs
    code, err, _ = _merge(capsys, *_argv(base, [tasks[0], f"file://{tasks[0]}/"], tmp / "o"))
    _one_line_error(code, err)
    assert "given twice" in err


# -- 5. typed configuration ------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("overwrite", "no", "overwrite = 'no': must be true or false"),
    ("fuse_qkv", "false", "fuse_qkv = 'false': must be true or false"),
    ("resume", 1, "resume = 1: must be true or false"),
    ("workers", "two", "workers = 'two': must be a whole number"),
    ("threads", 1.5, "threads = 1.5: must be a whole number"),
    ("alpha", "abc", "alpha = 'abc': must be a number"),
    ("alpha", True, "alpha = True: must be a number, not true/false"),
    ("params", 0.8, "params = 0.8: must be a mapping"),
    ("finetuned", 3, "finetuned = 3: must be a list of strings"),
    ("engine", "fast", "engine = 'fast'"),
    ("output_dtype", "int8", "output_dtype = 'int8'"),
    ("max_shard_size", "lots", "not a size"),
    ("gpus_per_task", 1.5, "must be a fraction in (0, 1] or a whole number"),
])
def test_yaml_values_are_type_checked(field, value, message, inputs, capsys, no_tensor_reads):
    tmp, base, tasks = inputs
    (tmp / "keep").mkdir()
    (tmp / "keep" / "notes.txt").write_text("precious")
    values = {"base": base, "finetuned": tasks, "method": "iso_cts", "alpha": 1.0,
              "out": str(tmp / "keep"), field: value}
    (tmp / "m.yaml").write_text(yaml.safe_dump(values))
    code = main(["merge", "--config", str(tmp / "m.yaml")])
    err = capsys.readouterr().err.strip()
    _one_line_error(code, err)
    assert message in err and "m.yaml" in err, err
    assert (tmp / "keep" / "notes.txt").read_text() == "precious"


def test_unambiguous_numbers_are_coerced(inputs, capsys):
    tmp, base, tasks = inputs
    text = (f"base: {base}\nfinetuned: [{tasks[0]}, {tasks[1]}]\nmethod: iso_cts\n"
            f"alpha: 1e-1\nworkers: '1'\nparams: {{common_space_fraction: '0.5'}}\n"
            f"out: {tmp / 'out'}\nengine: local\n")
    (tmp / "m.yaml").write_text(text)
    assert yaml.safe_load(text)["alpha"] == "1e-1"  # PyYAML reads it as a string
    assert main(["merge", "--config", str(tmp / "m.yaml")]) == 0
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert report["alpha"] == 0.1 and report["params"] == {"common_space_fraction": 0.5}


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "1,5"], "--alpha = '1,5': must be a number"),
    (["--workers", "0"], "--workers = '0': must be greater than or equal to 1"),
    (["--threads", "two"], "--threads = 'two': must be a whole number"),
    (["--output-dtype", "fp8"], "--output-dtype = 'fp8'"),
    (["--engine", "spark"], "--engine = 'spark'"),
])
def test_flags_are_validated_by_the_same_model(argv, message, inputs, capsys):
    tmp, base, tasks = inputs
    given = ["--base", base, "--finetuned", *tasks, "--method", "iso_cts", "--out",
             str(tmp / "out"), *argv]
    given += [] if "--alpha" in argv else ["--alpha", "1"]
    given += [] if "--engine" in argv else ["--engine", "local"]
    code = main(["merge", *given])
    err = capsys.readouterr().err.strip()
    _one_line_error(code, err)
    assert message in err


def test_a_quoted_false_never_fuses(inputs, capsys):
    tmp, base, tasks = inputs
    (tmp / "m.yaml").write_text(yaml.safe_dump({"fuse_qkv": "false"}))
    code = main(["merge", "--config", str(tmp / "m.yaml"), *_argv(base, tasks, tmp / "o")])
    _one_line_error(code, capsys.readouterr().err.strip())
    assert not (tmp / "o").exists()


# -- 6. every check that needs no tensor bytes comes first -----------------------------------
def test_output_problems_are_found_before_any_tensor_is_read(inputs, capsys, monkeypatch,
                                                            no_tensor_reads):
    tmp, base, tasks = inputs
    (tmp / "file.txt").write_text("x")
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "file.txt" / "out"))
    _one_line_error(code, err)
    assert "cannot be created" in err
    (tmp / "exists").mkdir()
    (tmp / "exists" / "x").write_text("x")
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "exists"))
    _one_line_error(code, err)
    assert "already exists" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 10))
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "new"))
    assert code == 1 and "only 10 are free" in err and len(err.splitlines()) == 1


def test_an_unwritable_parent_is_found_before_any_tensor_is_read(inputs, capsys,
                                                                 no_tensor_reads):
    tmp, base, tasks = inputs
    target = "/proc/merge-pipeline-test/out"  # /proc refuses new entries, even for root
    code, err, _ = _merge(capsys, *_argv(base, tasks, target))
    _one_line_error(code, err)
    assert "cannot be created" in err


# -- 9. verify says exactly what it checked --------------------------------------------------
@pytest.fixture
def merged(inputs, capsys):
    tmp, base, tasks = inputs
    code, err, _ = _merge(capsys, *_argv(base, tasks, tmp / "out", "--max-shard-size", "500B"))
    assert code == 0, err
    return tmp / "out"


def test_verify_fails_on_a_missing_config(merged, capsys):
    os.remove(merged / "config.json")
    assert main(["verify", str(merged)]) == 1
    assert "config.json: missing" in capsys.readouterr().err


def test_verify_fails_on_a_missing_index_with_exit_1(merged, capsys):
    os.remove(merged / "model.safetensors.index.json")
    assert main(["verify", str(merged)]) == 1
    assert "model.safetensors.index.json: missing" in capsys.readouterr().err


def test_verify_fails_on_a_malformed_report_in_one_line(merged, capsys):
    (merged / "merge_report.json").write_text('{"outputs": [{"name": 3}]')
    assert main(["verify", str(merged)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not valid JSON" in err and len(err.splitlines()) == 1
    (merged / "merge_report.json").write_text('{"outputs": "all of them"}')
    assert main(["verify", str(merged)]) == 1
    err = capsys.readouterr().err.strip()
    assert "malformed" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_verify_never_claims_an_unreachable_base_was_checked(merged, inputs, capsys):
    tmp, base, _ = inputs
    assert main(["verify", str(merged)]) == 0
    assert "every key of the base" in capsys.readouterr().out
    shutil.rmtree(base)
    assert main(["verify", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "not checked: keys against the base" in out
    assert "every key of the base" not in out


def test_verify_of_a_directory_that_is_not_an_output_exits_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert main(["verify", str(tmp_path / "nope")]) == 2


# -- 11. mixed input dtypes, chosen output dtype ---------------------------------------------
def test_fp32_base_with_bf16_finetunes_merges(tmp_path):
    base = _model(tmp_path / "base", 0)
    tasks = [_model(tmp_path / f"t{i}", i, torch.bfloat16) for i in (1, 2)]
    report = run_merge(MergeConfig(base=base, finetuned=tasks, method="iso_cts", alpha=1.0,
                                   out=str(tmp_path / "out"), engine="local"))
    assert report.dtypes.inputs == {base: ["F32"], tasks[0]: ["BF16"], tasks[1]: ["BF16"]}
    assert report.dtypes.compute == "F32" and report.dtypes.output == ["F32", "I64"]
    with open_checkpoint(str(tmp_path / "out")) as merged:
        assert merged.read("enc.layers.0.fc.weight").dtype == torch.float32
        assert merged.read("enc.steps").dtype == torch.int64
    report = run_merge(MergeConfig(base=base, finetuned=tasks, method="iso_cts", alpha=1.0,
                                   out=str(tmp_path / "bf16"), engine="local",
                                   output_dtype="bfloat16"))
    assert report.dtypes.output == ["BF16", "I64"]
    with open_checkpoint(str(tmp_path / "bf16")) as merged:
        assert merged.read("enc.layers.0.fc.weight").dtype == torch.bfloat16
        assert merged.read("enc.steps").dtype == torch.int64


def test_mixed_dtypes_merge_like_the_upcast_inputs(tmp_path):
    """bf16 fine-tunes give the same merge as their exact fp32 upcasts."""
    base = _model(tmp_path / "base", 0)
    bf16 = [_model(tmp_path / f"b{i}", i, torch.bfloat16) for i in (1, 2)]
    upcast = []
    for i, path in enumerate(bf16):
        with open_checkpoint(path) as ckpt:
            tensors = {k: ckpt.read(k) for k in ckpt.keys()}
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        directory = tmp_path / f"u{i}"
        directory.mkdir()
        write_safetensors(str(directory / "model.safetensors"), tensors)
        upcast.append(str(directory))
    a = run_merge(MergeConfig(base=base, finetuned=bf16, method="tsv_m", alpha=1.0,
                              out=str(tmp_path / "a"), engine="local"))
    b = run_merge(MergeConfig(base=base, finetuned=upcast, method="tsv_m", alpha=1.0,
                              out=str(tmp_path / "b"), engine="local"))
    assert [f.sha256 for f in a.outputs] == [f.sha256 for f in b.outputs]


def test_float_against_integer_is_still_refused(tmp_path, capsys):
    base = _model(tmp_path / "base", 0)
    weights = _weights(1)
    weights["enc.layers.0.fc.bias"] = torch.ones(12, dtype=torch.int32)
    (tmp_path / "bad").mkdir()
    write_safetensors(str(tmp_path / "bad" / "model.safetensors"), weights)
    code, err, _ = _merge(capsys, *_argv(base, [str(tmp_path / "bad")], tmp_path / "o"))
    _one_line_error(code, err)
    assert "dtype I32" in err


# -- smaller things ----------------------------------------------------------------------------
def test_help_documents_every_flag_methods_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for name in MergeConfig.model_fields:
        assert name.replace("_", "-") in text or name in ("params", "scan_inputs")
    assert "--param NAME=VALUE" in text and "--no-input-scan" in text
    assert "[required]" in text
    assert "common_space_fraction=0.8" in text and "k=20" in text
    for code in ("130", "143", "  2 ", "  1 "):
        assert code in text
    assert "previous output of merge-pipeline" in " ".join(text.split())
    import argparse
    from pipeline.cli.main import build_parser
    merge = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                 if a[0] == "merge")[1]
    undocumented = [a.option_strings for a in merge._actions
                    if a.option_strings and a.help in (None, "", argparse.SUPPRESS)]
    assert undocumented == []


def test_auto_engine_merges_small_models_in_process_and_says_why(inputs, capsys):
    tmp, base, tasks = inputs
    report = run_merge(MergeConfig(base=base, finetuned=tasks, method="iso_c", alpha=1.0,
                                   out=str(tmp / "out")))
    assert report.engine.kind == "local"
    assert report.engine.chosen.startswith("auto: small merge")
    assert "executor_start" in report.timings_s


def test_verify_reads_reports_from_before_schema_versions_and_refuses_newer_ones(merged,
                                                                                  capsys):
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["schema_version"] == 2
    old = {k: v for k, v in report.items() if k not in ("schema_version", "metadata_files")}
    (merged / "merge_report.json").write_text(json.dumps(old))
    assert main(["verify", str(merged)]) == 0
    assert "not checked: index/config.json bytes" in capsys.readouterr().out
    (merged / "merge_report.json").write_text(json.dumps({**report, "schema_version": 99}))
    assert main(["verify", str(merged)]) == 1
    err = capsys.readouterr().err.strip()
    assert "schema version 99 is newer" in err and len(err.splitlines()) == 1


def test_the_report_is_a_typed_record_that_round_trips(merged):
    from pipeline.engine.records import MergeReport
    text = (merged / "merge_report.json").read_text()
    report = MergeReport.from_json(text)
    assert report.to_json() == text
    assert report.engine.kind == "local" and report.outputs and report.metadata_files


def test_a_repeated_list_flag_adds_and_a_repeated_single_flag_is_refused(inputs, capsys):
    """`--finetuned a --finetuned b` means both tasks (argparse alone would keep only b and
    merge one task silently); `--out a --out b` is ambiguous and refused."""
    tmp, base, tasks = inputs
    code, err, _ = _merge(capsys, "--base", base, "--finetuned", tasks[0], "--finetuned",
                          *tasks[1:], "--method", "task_arithmetic", "--alpha", "0.5",
                          "--out", str(tmp / "out"))
    assert code == 0, err
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert report["num_tasks"] == len(tasks)
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit: usage, then the error
        _merge(capsys, *_argv(base, tasks, tmp / "a"), "--out", str(tmp / "b"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--out: given twice" in err
    assert not (tmp / "a").exists() and not (tmp / "b").exists()
