"""Half-precision checkpoints: the math runs upcast, the output keeps the checkpoint's dtype."""

from __future__ import annotations

import pytest
import torch

from pipeline.io import open_checkpoint
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.bench.examples import write_example


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_keeps_dtype_and_matches_float32(dtype, tmp_path):
    """A half-precision merge is the float32 merge of the same (upcast) inputs, rounded once
    at the end: never worse than half an ulp of the output dtype."""
    import os
    from pipeline.io import write_safetensors
    half = write_example(str(tmp_path / "half"), "tiny", num_tasks=2, dtype=dtype)
    upcast = []
    for path in [half[0], *half[1]]:
        target = tmp_path / "upcast" / os.path.basename(path)
        target.mkdir(parents=True)
        with open_checkpoint(path) as ckpt:
            write_safetensors(str(target / "model.safetensors"),
                              {k: ckpt.read(k).float() for k in ckpt.keys()})
        upcast.append(str(target))
    outputs = {}
    for name, (base, tuned) in {"half": half, "full": (upcast[0], upcast[1:])}.items():
        run_merge(MergeConfig(base=base, finetuned=list(tuned), method="iso_c", alpha=1.0,
                              out=str(tmp_path / f"out-{name}"), engine="local"))
        outputs[name] = open_checkpoint(str(tmp_path / f"out-{name}"))
    for key in outputs["full"].keys():
        got, want = outputs["half"].read(key), outputs["full"].read(key)
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype)), key


def test_float64_compute_agrees_with_float32(tiny_example, tmp_path):
    base, tuned = tiny_example
    for dtype in ("float32", "float64"):
        run_merge(MergeConfig(base=base, finetuned=list(tuned), method="iso_cts", alpha=1.0,
                              out=str(tmp_path / dtype), engine="local", compute_dtype=dtype,
                              output="task_vector"))
    f32, f64 = open_checkpoint(str(tmp_path / "float32")), open_checkpoint(str(tmp_path / "float64"))
    for key in f64.keys():
        a, b = f32.read(key).double(), f64.read(key)
        assert b.dtype == torch.float64
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-12, key
