"""One read of every input byte per merge: the workers hash each stored tensor as they read it,
and the report's input digests, the duplicate-task check, NaN/Inf and --resume's input check
all come from that one read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest
import torch
from conftest import output_bytes

from pipeline.bench.examples import VIT_SHAPES, base_weights, finetune_like, vit_shapes
from pipeline.cli.main import main
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import InputError
from pipeline.io import write_safetensors
from pipeline.runtime.executors import LocalExecutor

INDEX = "model.safetensors.index.json"


def _write_checkpoint(directory, weights, sharded=False):
    """A model directory: one model.safetensors, or two files and an index."""
    os.makedirs(directory, exist_ok=True)
    if not sharded:
        write_safetensors(os.path.join(directory, "model.safetensors"), weights)
        return str(directory)
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        write_safetensors(os.path.join(directory, name), {k: weights[k] for k in part})
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"weight_map": {k: n for n, part in halves.items() for k in part}}, f)
    return str(directory)


def _weights(seed):
    """The tiny ViT with two integer buffers: one inside a block, one in a group of its own
    (which a task vector writes nothing for, so no file's units contain it)."""
    base = base_weights(vit_shapes(VIT_SHAPES["tiny"]), 0)
    weights = base if seed == 0 else finetune_like(base, seed)
    return {**weights, "steps": torch.tensor(7 + seed),
            "vision_model.encoder.layers.0.counter": torch.arange(4) + seed}


@pytest.fixture
def inputs(tmp_path):
    base = _write_checkpoint(tmp_path / "inputs" / "base", _weights(0))
    tuned = [_write_checkpoint(tmp_path / "inputs" / f"task{i}", _weights(i), sharded=i == 2)
             for i in (1, 2, 3)]
    return tmp_path, base, tuned


def _files(location):
    if os.path.isfile(os.path.join(location, INDEX)):
        with open(os.path.join(location, INDEX)) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(location, n) for n in names]
    return [os.path.join(location, "model.safetensors")]


def _parse(path):
    raw = open(path, "rb").read()
    end = 8 + struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:end])
    header.pop("__metadata__", None)
    return raw, end, header


def _independent_digest(path):
    """sha256(header bytes || sha256 of each tensor in data order), from the raw file."""
    raw, end, header = _parse(path)
    digest = hashlib.sha256(raw[:end])
    for a, b in sorted(v["data_offsets"] for v in header.values()):
        digest.update(hashlib.sha256(raw[end + a:end + b]).digest())
    return digest.hexdigest()


def _data_bytes(locations):
    total = 0
    for location in locations:
        for path in _files(location):
            raw, end, _ = _parse(path)
            total += len(raw) - end
    return total


class _Workers(LocalExecutor):
    """In-process, planned as for `n` workers (so 4n shards): the same bits, other shards."""

    def __init__(self, n):
        super().__init__("cpu")
        self.workers = n


def _config(base, tuned, out, method="iso_c", **overrides):
    alpha = None if method in ("average", "tsv_c") else 1.0
    return MergeConfig(base=base, finetuned=list(tuned), method=method, alpha=alpha,
                       out=str(out), engine="local", **overrides)


@pytest.mark.parametrize("method,output", [("iso_c", "model"), ("tsv_m", "task_vector")])
def test_every_input_byte_is_read_once_and_digests_match_the_files(method, output, inputs):
    tmp, base, tuned = inputs
    total = _data_bytes([base, *tuned])
    reports = {}
    for workers in (1, 2):
        out = tmp / f"out{workers}"
        report = run_merge(_config(base, tuned, out, method, output=output),
                           executor=_Workers(workers))
        shards = report.engine.shards
        assert len(shards) > 1 and sum(s.bytes_read for s in shards) == total, workers
        reports[workers] = report
    assert output_bytes(tmp / "out1") == output_bytes(tmp / "out2")
    assert reports[1].inputs == reports[2].inputs
    for ckpt in [reports[1].inputs["base"], *reports[1].inputs["finetuned"]]:
        assert [f["path"] for f in ckpt["files"]] == _files(ckpt["location"])
        for f in ckpt["files"]:
            assert f["tensor_sha256"] == _independent_digest(f["path"])
            assert f["size"] == os.path.getsize(f["path"])
    assert "scan_inputs" not in reports[1].timings_s


@pytest.mark.slow
def test_ray_shards_read_every_input_byte_once(inputs, ray_cluster):
    from pipeline.runtime.executors import RayExecutor
    tmp, base, tuned = inputs
    local = run_merge(_config(base, tuned, tmp / "local"))
    report = run_merge(_config(base, tuned, tmp / "ray"), executor=RayExecutor(workers=2))
    assert sum(s.bytes_read for s in report.engine.shards) == _data_bytes([base, *tuned])
    assert report.inputs == local.inputs
    assert output_bytes(tmp / "ray") == output_bytes(tmp / "local")


def test_without_hashing_the_report_has_no_digests(inputs):
    tmp, base, tuned = inputs
    report = run_merge(_config(base, tuned, tmp / "out", scan_inputs=False))
    assert report.inputs == {"base": {"location": base},
                             "finetuned": [{"location": t} for t in tuned]}


def test_duplicate_task_is_one_line_exit_2_and_nothing_committed(inputs, capsys):
    tmp, base, tuned = inputs
    copy = shutil.copytree(tuned[0], tmp / "copy")
    out = tmp / "out"
    code = main(["merge", "--engine", "local", "--base", base, "--finetuned", tuned[0],
                 str(copy), "--method", "iso_c", "--alpha", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "same content (sha256)" in err, err
    assert sorted(os.listdir(tmp)) == ["copy", "inputs"]  # no output, no staging
    base_copy = shutil.copytree(base, tmp / "base_copy")
    with pytest.warns(UserWarning, match="identical to the base"):
        run_merge(_config(base, [tuned[0], str(base_copy)], out))
    assert os.path.isfile(out / "merge_report.json")


def test_nan_in_a_late_shard_is_one_line_and_nothing_committed(inputs, capsys):
    """The shard that reads the bad tensor refuses it after other shards wrote their files:
    the staging goes, nothing is committed."""
    tmp, base, tuned = inputs
    weights = _weights(3)
    weights["vision_model.post_layernorm.weight"][1] = float("nan")  # the stem: a small shard
    bad = _write_checkpoint(tmp / "bad", weights)
    done = []

    class Recording(LocalExecutor):
        def imap(self, fn, calls, desc=""):
            for i, result in super().imap(fn, calls, desc):
                done.append(i)
                yield i, result

    with pytest.raises(InputError, match="'vision_model.post_layernorm.weight' contains NaN"):
        run_merge(_config(base, [tuned[0], bad], tmp / "out"), executor=Recording())
    assert done, "the bad shard was not the first one"
    assert sorted(os.listdir(tmp)) == ["bad", "inputs"]
    code = main(["merge", "--engine", "local", "--base", base, "--finetuned", tuned[0], bad,
                 "--method", "iso_c", "--alpha", "1", "--out", str(tmp / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "contains NaN or Inf" in err, err
    assert sorted(os.listdir(tmp)) == ["bad", "inputs"]


class _InterruptAfter(LocalExecutor):
    """Ctrl-C after `n` shards; records what `hash_inputs` (--resume's check) was asked."""

    def __init__(self, n=None):
        super().__init__("cpu")
        self.n, self.rehashed = n, []

    def imap(self, fn, calls, desc=""):
        if fn.__name__ == "hash_inputs":
            self.rehashed += [c[0] for c in calls]
        if fn.__name__ == "run_shard" and self.n is not None:
            calls = calls[:self.n]
        yield from super().imap(fn, calls, desc)
        if fn.__name__ == "run_shard" and self.n is not None:
            raise KeyboardInterrupt


def _flip_in_place(path, key):
    """Change one value of `key` without changing the file's size or header."""
    raw, end, header = _parse(path)
    start = end + header[key]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(struct.pack("<f", struct.unpack("<f", raw[start:start + 4])[0] + 0.25))


def _interrupted(base, tuned, out):
    with pytest.raises(KeyboardInterrupt):
        run_merge(_config(base, tuned, out), executor=_InterruptAfter(2))
    staging = [p for p in os.listdir(os.path.dirname(out)) if ".merge-staging-" in p]
    assert len(staging) == 1
    directory = os.path.join(os.path.dirname(out), staging[0])
    markers = {}
    for name in os.listdir(directory):
        if name.endswith(".done.json"):
            with open(os.path.join(directory, name)) as f:
                marker = json.load(f)
            markers[marker["name"]] = marker
    assert len(markers) == 2
    return markers


def test_resume_recomputes_files_whose_inputs_changed_in_place(inputs):
    tmp, base, tuned = inputs
    out = tmp / "out"
    markers = _interrupted(base, tuned, out)
    victim = sorted(markers)[0]
    key = next(k for k in markers[victim]["inputs"][tuned[0]] if k.endswith("fc1.weight"))
    path = _files(tuned[0])[0]
    size, digest = os.path.getsize(path), _parse(path)[1]
    _flip_in_place(path, key)
    assert (os.path.getsize(path), _parse(path)[1]) == (size, digest)  # same size and header
    executor = _InterruptAfter()
    report = run_merge(_config(base, tuned, out, resume=True), executor=executor)
    assert report.resumed_files == sorted(set(markers) - {victim})
    run_merge(_config(base, tuned, tmp / "fresh"))
    assert output_bytes(out) == output_bytes(tmp / "fresh")
    for f in report.inputs["finetuned"][0]["files"]:
        assert f["tensor_sha256"] == _independent_digest(f["path"])


def test_resume_rehashes_only_the_reused_files_inputs_once(inputs):
    tmp, base, tuned = inputs
    out = tmp / "out"
    markers = _interrupted(base, tuned, out)
    executor = _InterruptAfter()
    report = run_merge(_config(base, tuned, out, resume=True), executor=executor)
    assert report.resumed_files == sorted(markers)
    assert len(executor.rehashed) == len(markers)  # one check per reused file
    rehashed = {(loc, k) for wanted in executor.rehashed for loc, keys in wanted.items()
                for k in keys}
    assert rehashed == {(loc, k) for m in markers.values() for loc, keys in m["inputs"].items()
                        for k in keys}
    sizes = {}
    for location in [base, *tuned]:
        for path in _files(location):
            _, _, header = _parse(path)
            sizes.update({(location, k): v["data_offsets"][1] - v["data_offsets"][0]
                          for k, v in header.items()})
    shard_bytes = sum(s.bytes_read for s in report.engine.shards)
    assert shard_bytes + sum(sizes[k] for k in rehashed) == sum(sizes.values())  # each once
    for ckpt in [report.inputs["base"], *report.inputs["finetuned"]]:
        for f in ckpt["files"]:
            assert f["tensor_sha256"] == _independent_digest(f["path"])
    run_merge(_config(base, tuned, tmp / "fresh"))
    assert output_bytes(out) == output_bytes(tmp / "fresh")
