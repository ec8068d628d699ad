"""A method registered outside `pipeline/` runs on the engine with no engine edit.

DARE-TIES here is a seeded drop-and-rescale (each task vector entry dropped with probability
p, the rest scaled by 1/(1-p), seeded per key so the result never depends on which worker
merged the key) followed by TIES' trim / elect / disjoint mean, whose model-wide statistics
come from the TIES statistics hook. The engine only knows the hooks; the test checks the
sharded result against a whole-model reference, across 1 and 3 Ray workers, bit for bit.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import ray.cloudpickle
import torch

from pipeline.io import open_checkpoint
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.runtime.executors import RayExecutor
from pipeline.methods import LINEAR_ALPHA_GRID, get_method, method_names, register
from pipeline.methods.ties import TiesStatistics, reference_thresholds, ties

# Ray's workers cannot import a test module: ship its functions by value (Ray pickles with its
# own cloudpickle). A method in an importable module (a job's working_dir) needs nothing.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DROP = 0.3


def _drop_and_rescale(deltas: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    keep = torch.rand(deltas.shape, generator=generator) >= DROP
    return deltas * keep.to(deltas.dtype) / (1 - DROP)


if "dare_ties_test" not in method_names():  # pytest may import this module twice
    @register("dare_ties_test", "elementwise", alpha_grid=LINEAR_ALPHA_GRID,
              statistics=TiesStatistics())
    def dare_ties(deltas: torch.Tensor, *, key: str, thresholds, majority_sign: int,
                  seed: int = 7, k: float = 20.0) -> torch.Tensor:
        """Drop-and-rescale, then TIES with the model-wide thresholds and majority sign."""
        return ties(_drop_and_rescale(deltas, key, seed), thresholds=thresholds,
                    majority_sign=majority_sign, k=k)


def _task_vectors(base, tuned):
    with open_checkpoint(base) as b:
        theta0 = {k: b.read(k) for k in b.keys() if b.spec(k).is_float}
    stacks = {k: [] for k in theta0}
    for path in tuned:
        with open_checkpoint(path) as c:
            for k in theta0:
                stacks[k].append(c.read(k).float() - theta0[k].float())
    return theta0, {k: torch.stack(v) for k, v in stacks.items()}


def test_registered_method_uses_hooks_only():
    method = get_method("dare_ties_test")
    assert method.wants_key and method.statistics is not None
    assert method.defaults == {"seed": 7, "k": 20.0}


@pytest.mark.slow
def test_a_method_registered_outside_the_package_merges_bit_identically(
        tiny_example, ray_cluster, tmp_path):
    base, tuned = tiny_example
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        report = run_merge(MergeConfig(base=base, finetuned=list(tuned), method="dare_ties_test",
                                       output="task_vector", params={"seed": 3}, out=str(out)),
                           executor=RayExecutor(workers=workers))
        assert report.engine.workers == workers
        outputs[workers] = {n: (out / n).read_bytes() for n in sorted(os.listdir(out))
                            if n.endswith(".safetensors")}
    assert outputs[1] == outputs[3]

    # The statistics hook's thresholds are the whole-model kthvalue, and every key was
    # dropped with its own seed: equal to the computation done here in one process.
    _, task_vectors = _task_vectors(base, tuned)
    thresholds = torch.tensor(report.statistics["thresholds"])
    assert torch.equal(thresholds, reference_thresholds(task_vectors, 20.0))
    sign = report.statistics["majority_sign"]
    with open_checkpoint(str(tmp_path / "w3")) as merged:
        for key in ("vision_model.encoder.layers.0.mlp.fc1.weight",
                    "vision_model.post_layernorm.bias"):
            want = ties(_drop_and_rescale(task_vectors[key], key, 3), thresholds=thresholds,
                        majority_sign=sign, k=20.0)
            assert torch.equal(merged.read(key), want), key
