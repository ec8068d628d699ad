"""Checkpoint I/O: our safetensors reader/writer, every input layout, corrupt files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.io import SafetensorsFile, open_checkpoint, write_safetensors
from pipeline.io.safetensors_io import build_header
from pipeline.errors import CorruptFileError, InputError

TENSORS = {
    "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
    "f64": torch.randn(2, dtype=torch.float64), "i64": torch.arange(6).reshape(2, 3),
    "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_our_files_round_trip_and_official_reader_agrees(tmp_path):
    path = str(tmp_path / "t.safetensors")
    written = write_safetensors(path, TENSORS)
    with SafetensorsFile(path) as f:
        assert_same({k: f.read(k) for k in f.entries}, TENSORS)
        assert f.metadata == {"format": "pt"}
    assert_same(load_file(path), TENSORS)
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(TENSORS)
    import hashlib
    assert written.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert written.size == os.path.getsize(path)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_official_files_are_read_by_ours(tmp_path):
    path = str(tmp_path / "o.safetensors")
    save_file({k: v for k, v in TENSORS.items()}, path, metadata={"x": "y"})
    with SafetensorsFile(path) as f:
        assert_same({k: f.read(k) for k in f.entries}, TENSORS)
        assert f.metadata == {"x": "y"}


def corrupt(tmp_path, mutate) -> str:
    path = tmp_path / "bad.safetensors"
    write_safetensors(str(path), {"a": torch.ones(4), "b": torch.zeros(2, 2)})
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))
    return str(path)


def with_header(header: dict, data: bytes = b"\0" * 32) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:-5], "truncated"),
    (lambda d: d[:12], "past the end"),
    (lambda d: b"", "too short"),
    (lambda d: d + b"junk", "after the last tensor"),
    (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "exceeds"),
    (lambda d: struct.pack("<Q", 10) + b"not json!!" + d[18:], "not valid JSON"),
    (lambda d: with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}),
     "overlaps"),
    (lambda d: with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}),
     "gap"),
    (lambda d: with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}),
     "spans"),
    (lambda d: with_header({"a": {"dtype": "Q7", "shape": [8], "data_offsets": [0, 32]}}),
     "unknown dtype"),
    (lambda d: with_header({"a": {"dtype": "F32", "shape": [-8], "data_offsets": [0, 32]}}),
     "invalid shape"),
    (lambda d: with_header({"a": {"dtype": "F32", "shape": [8], "data_offsets": [16, 0]}}),
     "invalid data_offsets"),
    (lambda d: with_header([1, 2]), "not a JSON object"),
])
def test_corrupt_files_raise_clear_errors(tmp_path, mutate, message):
    path = corrupt(tmp_path, mutate)
    with pytest.raises(CorruptFileError, match=message) as err:
        SafetensorsFile(path)
    assert path in str(err.value)


def test_header_is_padded_to_eight_bytes():
    header = build_header([("a", "F32", (3,))], {"format": "pt"})
    assert (len(header) - 8) % 8 == 0


# -- layouts -----------------------------------------------------------------------------------
def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"visual.conv1.weight": torch.randn(8, 3, 2, 2, generator=g),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g),
            "visual.ln_pre.weight": torch.randn(8, generator=g),
            "visual.positions": torch.arange(5)}


def test_hf_sharded_directory_reads_lazily(tmp_path):
    weights = state()
    files = {"model-00001-of-00002.safetensors": ["visual.conv1.weight", "visual.positions"],
             "model-00002-of-00002.safetensors": ["visual.ln_pre.weight",
                                                  "visual.transformer.resblocks.0.attn.in_proj_weight"]}
    for name, keys in files.items():
        write_safetensors(str(tmp_path / name), {k: weights[k] for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in files.items() for k in ks}}))
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.config_location.endswith("config.json")
    assert torch.equal(ckpt.read("visual.ln_pre.weight"), weights["visual.ln_pre.weight"])
    assert list(ckpt._open) == [str(tmp_path / "model-00002-of-00002.safetensors")], \
        "reading one key opened only the file holding it"
    assert_same({k: ckpt.read(k) for k in ckpt.keys()}, weights)


@pytest.mark.parametrize("wrap", ["plain", "open_clip_training", "ddp"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_torch_state_dicts(tmp_path, wrap, suffix):
    weights = state()
    obj = {"plain": weights, "ddp": {f"module.{k}": v for k, v in weights.items()},
           "open_clip_training": {"epoch": 3, "state_dict": {f"module.{k}": v
                                                             for k, v in weights.items()}}}[wrap]
    path = tmp_path / f"ckpt{suffix}"
    torch.save(obj, path)
    with open_checkpoint(str(path)) as ckpt:
        assert_same({k: ckpt.read(k) for k in ckpt.keys()}, weights)


def test_uri_inputs_go_through_pyarrow_fs(tmp_path):
    weights = state()
    write_safetensors(str(tmp_path / "model.safetensors"), weights)
    with open_checkpoint(f"file://{tmp_path}") as ckpt:
        assert ckpt.files == [f"file://{tmp_path}/model.safetensors"]
        assert_same({k: ckpt.read(k) for k in ckpt.keys()}, weights)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no model.safetensors"),
    (lambda p: p.write_text("x"), "unknown checkpoint format"),
])
def test_unopenable_locations(tmp_path, make, message):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(InputError, match=message):
        open_checkpoint(str(path))


def test_pickle_that_is_not_weights_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "cfg": {"lr": 1}}, path)
    with pytest.raises(InputError, match="not tensors"):
        open_checkpoint(str(path)).keys()
    (tmp_path / "garbage.bin").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CorruptFileError, match="garbage.bin"):
        open_checkpoint(str(tmp_path / "garbage.bin")).keys()


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CorruptFileError, match="outside"):
        open_checkpoint(str(tmp_path))


def test_index_listing_a_key_its_shard_lacks_is_a_clear_error(tmp_path):
    write_safetensors(str(tmp_path / "a.safetensors"), {"x": torch.ones(2)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    ckpt = open_checkpoint(str(tmp_path))
    with pytest.raises(CorruptFileError, match="has no key 'y'"):
        ckpt.read("y")


def test_uri_base_config_is_copied(tmp_path):
    from pipeline.engine.config import MergeConfig
    from pipeline.engine.driver import run_merge
    from pipeline.bench.examples import write_example
    base, tuned = write_example(str(tmp_path / "in"), "tiny", num_tasks=2)
    run_merge(MergeConfig(base=f"file://{base}", finetuned=tuned, method="iso_c", alpha=1.0,
                          out=str(tmp_path / "out"), engine="local"))
    expected = json.loads(open(os.path.join(base, "config.json")).read())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == expected
    from pipeline.engine.expand import expand_task
    run_merge(MergeConfig(base=f"file://{base}", finetuned=tuned, method="tsv_c",
                          out=str(tmp_path / "art"), engine="local"))
    expand_task(str(tmp_path / "art"), f"file://{base}", 0, str(tmp_path / "task0"))
    assert json.loads((tmp_path / "task0" / "config.json").read_text()) == expected
