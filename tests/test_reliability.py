"""Bad bytes, full disks and tampered outputs: a clear error, never a crash, never a half model."""

from __future__ import annotations

import errno
import os
import random
import struct
import time

import pytest
import torch

from pipeline.io import SafetensorsFile, write_safetensors
from pipeline.io import safetensors_io
from pipeline.cli.main import main
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import CorruptFileError, InputError, OutputError
from pipeline.engine.verify import verify_output


def valid_file_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.safetensors"
    write_safetensors(str(path), {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3).half(),
                                  "n": torch.tensor(5), "flag": torch.tensor([True, False])})
    return path.read_bytes()


def mutations(valid: bytes, rng: random.Random):
    (header_len,) = struct.unpack("<Q", valid[:8])
    for _ in range(1500):
        data = bytearray(valid)
        kind = rng.randrange(6)
        if kind == 0:  # flip bytes in the header
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(8, 8 + header_len)] = rng.randrange(256)
        elif kind == 1:  # truncate anywhere
            data = data[:rng.randrange(len(data))]
        elif kind == 2:  # lie about the header length
            data[:8] = struct.pack("<Q", rng.choice([0, 1, header_len - 1, header_len + 1,
                                                     len(data), 2**63, rng.randrange(2**64)]))
        elif kind == 3:  # insert bytes
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif kind == 4:  # replace a digit in the header (offsets, shapes)
            digits = [i for i in range(8, 8 + header_len) if chr(data[i]).isdigit()]
            data[rng.choice(digits)] = ord(str(rng.randrange(10)))
        else:  # append garbage
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        yield bytes(data)
    for _ in range(1500):
        yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))


def test_fuzzed_headers_give_a_clear_error_or_a_correct_read(tmp_path):
    """3000 random and mutated files: every one is refused with CorruptFileError or read
    consistently (each tensor's bytes exactly its declared size); nothing else escapes."""
    rng = random.Random(1234)
    valid = valid_file_bytes(tmp_path)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"refused": 0, "read": 0}
    started = time.monotonic()
    for data in mutations(valid, rng):
        path.write_bytes(data)
        try:
            with SafetensorsFile(str(path)) as f:
                for key, entry in f.entries.items():
                    tensor = f.read(key)
                    assert tensor.numel() * tensor.element_size() == entry.nbytes
            outcomes["read"] += 1
        except CorruptFileError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1
    assert time.monotonic() - started < 60
    assert outcomes["refused"] > 2000 and outcomes["read"] > 10, outcomes


@pytest.fixture
def example(tmp_path):
    from pipeline.bench.examples import write_example
    return write_example(str(tmp_path / "inputs"), "tiny", num_tasks=2)


def test_disk_full_mid_write_leaves_nothing_and_says_how_much_was_needed(example, tmp_path,
                                                                         monkeypatch):
    calls = {"n": 0}
    real = safetensors_io.tensor_bytes

    def fill_up(tensor):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(safetensors_io, "tensor_bytes", fill_up)
    with pytest.raises(OutputError, match=r"No space left on device.*needs \d+ bytes.*whole "
                                          r"output needs \d+ bytes"):
        run_merge(MergeConfig(base=example[0], finetuned=example[1], method="iso_c", alpha=1.0,
                              out=str(tmp_path / "out"), engine="local"))
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def test_too_little_free_space_is_refused_before_compute(example, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    code = main(["merge", "--engine", "local", "--base", example[0], "--finetuned", *example[1],
                 "--method", "iso_c", "--alpha", "1", "--out", str(tmp_path / "out")])
    assert code == 1
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def test_verify_accepts_a_sound_output_and_names_what_is_wrong(example, tmp_path, capsys):
    out = tmp_path / "out"
    run_merge(MergeConfig(base=example[0], finetuned=example[1], method="tsv_m", alpha=1.0,
                          out=str(out), engine="local"))
    assert verify_output(str(out)).problems == []
    assert main(["verify", str(out)]) == 0
    files = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    with open(out / files[0], "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x7f\x7f\x7f")
    problems = verify_output(str(out)).problems
    assert any("sha256 differs" in p for p in problems)
    os.remove(out / files[1])
    assert main(["verify", str(out)]) == 1
    assert f"{files[1]}: no such file" in capsys.readouterr().err
    with pytest.raises(InputError, match="no merge_report.json"):
        verify_output(example[0])


def test_nan_is_refused_by_the_shard_that_reads_it_and_nothing_is_committed(example, tmp_path):
    """There is no separate input scan (one read per merge): the shard reading the tensor
    refuses it, and the staged output is removed."""
    from pipeline.io import open_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    with open_checkpoint(example[1][0]) as ckpt:
        weights = {k: ckpt.read(k).clone() for k in ckpt.keys()}
    key = sorted(k for k in weights if weights[k].dim() == 2)[0]
    weights[key][1, 1] = float("nan")
    write_safetensors(str(bad / "model.safetensors"), weights)
    executor_calls = []

    from pipeline.runtime.executors import LocalExecutor

    class Recording(LocalExecutor):
        def imap(self, fn, calls, desc=""):
            executor_calls.append(fn.__name__)
            return super().imap(fn, calls, desc)

    with pytest.raises(InputError, match=f"{key!r} contains NaN"):
        run_merge(MergeConfig(base=example[0], finetuned=[example[1][1], str(bad)],
                              method="iso_c", alpha=1.0, out=str(tmp_path / "out")),
                  executor=Recording())
    assert executor_calls == ["run_shard"], "no separate scan"
    assert sorted(os.listdir(tmp_path)) == ["bad", "inputs"]  # no output, no staging
