"""The Ray engine must give the in-process result bit for bit, at any worker count, on any
node layout, after retries, while the driver only ever sees manifests."""

from __future__ import annotations

import os
import pickle

import pytest
from conftest import output_bytes
import torch

from pipeline.io import open_checkpoint
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.runtime.executors import LocalExecutor, RayExecutor
from pipeline.engine.worker import Fault, ShardResult
from pipeline.methods.ties import reference_ties

pytestmark = pytest.mark.slow

METHOD_RUNS = {
    "average": (None, {}),
    "task_arithmetic": (0.4, {}),
    "ties": (0.5, {"k": 30}),
    "tsv_m": (1.0, {}),
    "iso_c": (1.2, {}),
    "iso_cts": (1.1, {"common_space_fraction": 0.8}),
    "tsv_c": (None, {}),
}


def merge(example, out, method, executor=None, engine="local", **overrides):
    base, tuned = example
    alpha, params = METHOD_RUNS[method]
    config = MergeConfig(base=base, finetuned=list(tuned), method=method, alpha=alpha,
                         params=params, out=str(out), engine=engine, **overrides)
    return run_merge(config, executor=executor)


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_ray_matches_in_process_at_any_worker_count(method, tiny_example, ray_cluster, tmp_path):
    merge(tiny_example, tmp_path / "local", method)
    expected = output_bytes(tmp_path / "local")
    assert len(expected) > 3
    for workers in (1, 2, 3):
        out = tmp_path / f"ray{workers}"
        report = merge(tiny_example, out, method, executor=RayExecutor(workers=workers))
        assert report.engine.workers == workers
        assert output_bytes(out) == expected, f"{method}: {workers} workers differ"


def test_shards_finishing_in_any_order_give_the_same_bits(tiny_example, ray_cluster, tmp_path):
    """Reverse the shard order the engine submits: completion order must not matter."""
    class Reversed(RayExecutor):
        def imap(self, fn, calls, desc=""):
            last = len(calls) - 1
            for i, result in super().imap(fn, list(reversed(calls)), desc):
                yield last - i, result

    merge(tiny_example, tmp_path / "a", "iso_cts", executor=RayExecutor(workers=2))
    merge(tiny_example, tmp_path / "b", "iso_cts", executor=Reversed(workers=2))
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")


def test_sharded_ties_equals_whole_model_ties(tiny_example, ray_cluster, tmp_path):
    """The radix-select threshold and the global majority sign make sharded TIES exact."""
    base_path, tuned_paths = tiny_example
    report = merge(tiny_example, tmp_path / "ties", "ties", executor=RayExecutor(workers=3),
                   output="task_vector")
    with open_checkpoint(base_path) as base:
        tuned = [open_checkpoint(p) for p in tuned_paths]
        vectors = {k: torch.stack([t.read(k).float() - base.read(k).float() for t in tuned])
                   for k in base.keys() if base.spec(k).is_float}
    expected = reference_ties(vectors, k=30)
    with open_checkpoint(str(tmp_path / "ties")) as merged:
        assert sorted(merged.keys()) == sorted(expected)
        for key, tensor in expected.items():
            assert torch.equal(merged.read(key), tensor), key
    assert len(report.statistics["thresholds"]) == len(tuned_paths)


def test_two_node_cluster_merges_and_writes(tiny_example, tmp_path):
    """Two simulated nodes (ray.cluster_utils.Cluster): shards spread, output identical."""
    import ray
    from ray.cluster_utils import Cluster

    merge(tiny_example, tmp_path / "local", "iso_cts")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        report = merge(tiny_example, tmp_path / "two", "iso_cts",
                       executor=RayExecutor(workers=2))
        assert len(ray.nodes()) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert output_bytes(tmp_path / "two") == output_bytes(tmp_path / "local")
    assert report.engine.workers == 2


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_failed_shard_is_retried_and_output_identical(kind, tiny_example, ray_cluster, tmp_path):
    """An exception (retry_exceptions) or a dead worker process (max_retries) mid-shard."""
    merge(tiny_example, tmp_path / "clean", "iso_cts", executor=RayExecutor(workers=2))
    marker = tmp_path / "fault-fired"
    report = run_merge(
        MergeConfig(base=tiny_example[0], finetuned=list(tiny_example[1]), method="iso_cts",
                    alpha=1.1, params={"common_space_fraction": 0.8},
                    out=str(tmp_path / "faulty")),
        executor=RayExecutor(workers=2), fault=Fault(shard=1, kind=kind, marker=str(marker)))
    assert marker.exists(), "the fault never fired"
    assert output_bytes(tmp_path / "faulty") == output_bytes(tmp_path / "clean")
    assert not [p for p in os.listdir(tmp_path / "faulty") if ".partial-" in p]
    assert report.method == "iso_cts"


@pytest.mark.parametrize("shard", [0, 1])
def test_injected_fault_without_retry_leaves_no_output(tiny_example, tmp_path, shard):
    """In-process there is no retry: the run fails and nothing appears at the destination.
    The recognisable staging directory remains for --resume only when a shard finished before
    the fault (shard 1); a fault in the first shard leaves nothing to resume from, and nothing
    behind."""
    from pipeline.errors import TransientError
    with pytest.raises(TransientError):
        run_merge(MergeConfig(base=tiny_example[0], finetuned=list(tiny_example[1]),
                              method="iso_c", alpha=1.0, out=str(tmp_path / "out"),
                              engine="local"),
                  fault=Fault(shard=shard, kind="raise", marker=str(tmp_path / "m")))
    left = sorted(os.listdir(tmp_path))
    if shard == 0:
        assert left == ["m"]
    else:
        assert len(left) == 2 and left[1] == "m" and ".out.merge-staging-" in left[0]
        assert os.listdir(tmp_path / left[0])


def _tensors_in(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, ShardResult):  # merged tensors returned to the driver count too
        return sum(len(arrays) for arrays in obj.tensors.values())
    if isinstance(obj, dict):
        return sum(_tensors_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors_in(v) for v in obj)
    return 0


@pytest.mark.parametrize("method", ["iso_cts", "ties"])
def test_driver_receives_only_manifests(method, tiny_example, tmp_path):
    """What reaches the driver is metadata whose size does not grow with the model: manifests
    (a few KB per shard) and, for TIES, histograms of at most 2**16 bins per task."""
    received = []

    class Recording(LocalExecutor):
        def imap(self, fn, calls, desc=""):
            for i, result in super().imap(fn, calls, desc):
                received.append(result)
                yield i, result

    merge(tiny_example, tmp_path / "m", method, executor=Recording())
    assert received and _tensors_in(received) == 0
    num_tasks = len(tiny_example[1])
    histogram_bound = num_tasks * 2**16 * (4 + 8)
    for result in received:
        size = len(pickle.dumps(result))
        assert size < (histogram_bound if isinstance(result, list) else 64 * 1024), size
    if method == "iso_cts":
        model_bytes = sum(os.path.getsize(tmp_path / "m" / f) for f in os.listdir(tmp_path / "m"))
        assert sum(len(pickle.dumps(r)) for r in received) < model_bytes / 10


def test_report_has_engine_section(tiny_example, ray_cluster, tmp_path):
    report = merge(tiny_example, tmp_path / "m", "tsv_m", executor=RayExecutor(workers=2))
    engine = report.engine
    assert engine.kind == "ray" and engine.workers == 2 and engine.ray_version
    assert engine.shards and all(s.seconds.total > 0 for s in engine.shards)
    assert sum(len(s.files) for s in engine.shards) == len(report.outputs)
    assert report.numerics.svd_calls > 0
    assert engine.peak_worker_rss_bytes == max(s.peak_rss_bytes for s in engine.shards)
    with open_checkpoint(tiny_example[0]) as base:
        sizes = [base.read(key).numel() for key in base.keys()]
    assert report.model.model_dump() == {"tensors": len(sizes), "parameters": sum(sizes)}


def test_threads_are_fixed_per_task_for_determinism(tiny_example, tmp_path):
    """1 vs 2 math threads may differ in the last bits (MACHINE-FACTS); the report records it
    and the same thread count always gives the same bits."""
    a = merge(tiny_example, tmp_path / "a", "iso_cts", threads=2)
    merge(tiny_example, tmp_path / "b", "iso_cts", threads=2)
    assert a.options["threads"] == 2
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")


def test_duplicate_task_content_is_refused_and_base_copy_warns(tiny_example, tmp_path):
    import shutil
    from pipeline.errors import InputError
    base, tuned = tiny_example
    copy = tmp_path / "copy"
    shutil.copytree(tuned[0], copy)
    with pytest.raises(InputError, match="same content"):
        run_merge(MergeConfig(base=base, finetuned=[tuned[0], str(copy)], method="iso_c",
                              alpha=1.0, out=str(tmp_path / "out"), engine="local"))
    assert sorted(os.listdir(tmp_path)) == ["copy"]
    base_copy = tmp_path / "base_copy"
    shutil.copytree(base, base_copy)
    with pytest.warns(UserWarning, match="identical to the base"):
        run_merge(MergeConfig(base=base, finetuned=[tuned[0], str(base_copy)], method="iso_c",
                              alpha=1.0, out=str(tmp_path / "out"), engine="local"))


@pytest.mark.parametrize("method", ["iso_cts", "ties"])
def test_resume_reuses_verified_files_and_gives_identical_output(method, tiny_example, tmp_path):
    """A driver killed mid-merge leaves its staging directory; --resume keeps the files whose
    checksums verify, recomputes the rest (and a tampered one), and matches a clean run."""
    merge(tiny_example, tmp_path / "clean", method)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_merge(MergeConfig(base=tiny_example[0], finetuned=list(tiny_example[1]),
                              method=method, alpha=METHOD_RUNS[method][0],
                              params=METHOD_RUNS[method][1], out=str(out), engine="local"),
                  executor=_InterruptAfter(2))
    staging = [p for p in os.listdir(tmp_path) if ".merge-staging-" in p]
    assert len(staging) == 1 and not out.exists()
    finished = sorted(p for p in os.listdir(tmp_path / staging[0]) if p.endswith(".safetensors"))
    assert len(finished) == 2  # of 3 files: the tiny model's two blocks and its stem/head
    with open(tmp_path / staging[0] / finished[0], "r+b") as f:  # corrupt one finished file
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    report = merge(tiny_example, out, method, resume=True)
    assert len(report.resumed_files) == 1
    assert finished[0] not in report.resumed_files
    assert output_bytes(out) == output_bytes(tmp_path / "clean")
    assert not [p for p in os.listdir(tmp_path) if ".merge-staging-" in p]
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_a_new_run_cleans_the_stale_staging_of_the_same_merge(tiny_example, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_merge(MergeConfig(base=tiny_example[0], finetuned=list(tiny_example[1]),
                              method="iso_c", alpha=METHOD_RUNS["iso_c"][0],
                              out=str(tmp_path / "out"), engine="local"),
                  executor=_InterruptAfter(2))
    assert [p for p in os.listdir(tmp_path) if ".merge-staging-" in p]
    report = merge(tiny_example, tmp_path / "out", "iso_c")
    assert report.resumed_files == []
    assert os.listdir(tmp_path) == ["out"]


class _InterruptAfter(LocalExecutor):
    """Runs shard by shard and raises KeyboardInterrupt after `n` merge calls, as a Ctrl-C."""

    def __init__(self, n):
        super().__init__("cpu")
        self.n = n

    def imap(self, fn, calls, desc=""):
        if fn.__name__ != "run_shard":
            yield from super().imap(fn, calls, desc)
            return
        for i, args in enumerate(calls):
            if i == self.n:
                raise KeyboardInterrupt
            yield i, fn(*args)


def test_resume_never_reuses_files_when_an_input_changed(tiny_example, tmp_path):
    """The staging key covers the inputs' sha256: after a change, nothing old is reused and the
    dead run's staging directory is cleaned."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_example[0], base)
    example = (str(base), tiny_example[1])
    with pytest.raises(KeyboardInterrupt):
        run_merge(MergeConfig(base=str(base), finetuned=list(tiny_example[1]), method="iso_c",
                              alpha=METHOD_RUNS["iso_c"][0], out=str(tmp_path / "out"),
                              engine="local"), executor=_InterruptAfter(2))
    from pipeline.io import open_checkpoint, write_safetensors
    with open_checkpoint(str(base)) as ckpt:
        weights = {k: ckpt.read(k).clone() for k in ckpt.keys()}
    for tensor in weights.values():
        if tensor.is_floating_point():
            tensor.mul_(1.01)
    os.remove(base / "model.safetensors")
    write_safetensors(str(base / "model.safetensors"), weights)
    report = merge(example, tmp_path / "out", "iso_c", resume=True)
    assert report.resumed_files == []
    assert sorted(os.listdir(tmp_path)) == ["base", "out"]


def test_in_process_merge_gives_the_callers_thread_count_back(tiny_example, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(tiny_example, tmp_path / "m", "iso_c", threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
