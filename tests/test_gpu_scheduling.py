"""GPU scheduling, checked on a CPU-only machine: a Ray node that *declares* GPUs lets us test
everything that does not need CUDA itself (which tasks and actors get which GPU, how many run
at once), and that a GPU run on a machine whose torch sees no CUDA stops in one line."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from conftest import ray_nodes

from pipeline.cli.main import main
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import InputError
from pipeline.evaluation import pool as pool_module
from pipeline.runtime import executors
from pipeline.runtime.executors import LocalExecutor, RayExecutor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_cluster():
    """One node with 8 logical CPUs and 2 declared GPUs (there is no CUDA behind them)."""
    with ray_nodes({"num_cpus": 8, "num_gpus": 2}) as (nodes, _):
        yield nodes


def _occupancy(executor: RayExecutor, tasks: int) -> tuple[int, Counter]:
    """Run `tasks` one-second tasks; return how many ran at once at most, and how many of
    those at the busiest moment held each GPU id."""
    def hold_gpu():
        import ray
        start = time.time()
        time.sleep(1.0)
        return tuple(ray.get_gpu_ids()), start, time.time()

    spans = executor.map(hold_gpu, [() for _ in range(tasks)])
    assert all(len(ids) == 1 for ids, _, _ in spans)  # each task sees exactly one GPU
    busiest, holders = 0, Counter()
    for _, start, _ in spans:
        running = [ids[0] for ids, s, e in spans if s <= start < e]
        if len(running) > busiest:
            busiest, holders = len(running), Counter(running)
    return busiest, holders


def test_shard_tasks_take_one_gpu_each(gpu_cluster):
    executor = RayExecutor(address=gpu_cluster.address)
    assert executor.device == "cuda" and executor.workers == 2
    busiest, holders = _occupancy(executor, 4)
    assert busiest == 2 and sorted(holders.values()) == [1, 1]


def test_half_a_gpu_per_task_packs_two_per_gpu(gpu_cluster):
    executor = RayExecutor(address=gpu_cluster.address, gpus_per_task=0.5)
    assert executor.workers == 4
    busiest, holders = _occupancy(executor, 8)
    assert busiest == 4 and sorted(holders.values()) == [2, 2]


def test_evaluation_actors_are_one_per_gpu(gpu_cluster, monkeypatch):
    class GpuProbe:  # stands in for the Evaluator, whose model would need real CUDA
        def __init__(self, base, tasks, preprocess, device, *rest):
            self.device = device

        def placement(self):
            import ray
            return self.device, tuple(ray.get_gpu_ids())

    monkeypatch.setattr(pool_module, "Evaluator", GpuProbe)
    pool = pool_module.EvaluationPool("unused", {}, address=gpu_cluster.address)
    import ray
    placements = ray.get([actor.placement.remote() for actor in pool.actors])
    assert pool.device == "cuda" and pool.workers == 2
    assert sorted(placements) == [("cuda", (0,)), ("cuda", (1,))]
    for actor in pool.actors:
        ray.kill(actor)


def test_the_gpu_count_is_read_again_as_the_cluster_grows(gpu_cluster, monkeypatch):
    monkeypatch.setattr(executors, "RESIZE_EVERY_S", 0.0)
    executor = RayExecutor(address=gpu_cluster.address)
    assert executor.capacity() == 2
    node = gpu_cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        gpu_cluster.wait_for_nodes()
        deadline = time.monotonic() + 20
        while executor.capacity() != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert executor.capacity() == 3
    finally:
        gpu_cluster.remove_node(node)


def test_a_gpu_run_where_torch_sees_no_cuda_names_the_node(gpu_cluster, tiny_example,
                                                           tmp_path):
    base, tuned = tiny_example
    config = MergeConfig(base=base, finetuned=list(tuned), method="iso_cts", alpha=1.0,
                         out=str(tmp_path / "out"), device="cuda")
    with pytest.raises(InputError, match="torch sees no CUDA device") as err:
        run_merge(config, executor=RayExecutor(address=gpu_cluster.address, device="cuda"))
    worker = next(n for n in gpu_cluster.list_all_nodes() if not n.head)
    assert worker.node_id[:12] in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_device_cuda_without_cuda_is_one_line_in_process(tiny_example, tmp_path, capsys):
    base, tuned = tiny_example
    code = main(["merge", "--engine", "local", "--device", "cuda", "--base", base,
                 "--finetuned", *tuned, "--method", "iso_c", "--alpha", "1", "--out",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no CUDA device" in err, err
    with pytest.raises(InputError, match="--device cuda"):
        LocalExecutor("cuda")
    with pytest.raises(InputError, match="--device cuda"):  # in-process evaluation alike
        pool_module.EvaluationPool("unused", {}, engine="local", device="cuda")


def test_device_cuda_on_a_cluster_without_gpus_is_refused(tiny_example, tmp_path):
    with ray_nodes(head={"num_cpus": 1}) as (nodes, _), \
            pytest.raises(InputError, match="has no GPUs"):
        RayExecutor(address=nodes.address, device="cuda")
