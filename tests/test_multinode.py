"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`): shards spread over nodes
and give the in-process bytes in either assembly; a node that does not share the output makes
`auto` assemble on the driver and `workers` refuse; an input a node cannot read, and a file a
worker wrote where the driver cannot see it, stop the merge before anything is committed; a
node killed mid-merge is survived."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import output_bytes, ray_nodes

from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.engine.probe import HiddenPath
from pipeline.engine.worker import Fault
from pipeline.errors import InputError, OutputError
from pipeline.runtime.executors import RayExecutor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no work and two worker nodes of one CPU each, each with a worker
    process started: a node whose first worker is still starting, or whose resources the
    scheduler does not see yet, would let the other node take every shard."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    with ray_nodes({"num_cpus": 1}, {"num_cpus": 1}) as nodes:
        ray.init(address=nodes[0].address)

        @ray.remote(num_cpus=1)
        def node_id() -> str:
            return ray.get_runtime_context().get_node_id()

        pinned = [node_id.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote() for node in nodes[1]]
        assert ray.get(pinned) == [node.node_id for node in nodes[1]]
        yield nodes


def config(example, out, **overrides) -> MergeConfig:
    base, tuned = example
    return MergeConfig(base=base, finetuned=list(tuned), method="iso_cts", alpha=1.0,
                       out=str(out), max_shard_size="100KB", **overrides)


@pytest.fixture(scope="module")
def expected(tiny_example, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_process") / "out"
    run_merge(config(tiny_example, out, engine="local"))
    return output_bytes(out)


def on(cluster) -> RayExecutor:
    """Two tasks in flight, one per node (fixed, so that a resource view still settling right
    after the nodes joined cannot make it one)."""
    return RayExecutor(address=cluster[0].address, workers=2)


def test_shards_spread_over_nodes_and_match_in_process(cluster, tiny_example, expected,
                                                       tmp_path):
    nodes = {w.node_id for w in cluster[1]}
    for assembly in ("workers", "driver"):
        # These shards take milliseconds: when one ends before the other node's worker lease
        # is granted, Ray hands the next shard to the worker it already holds (lease reuse),
        # and a whole run can stay on one node (1 run in ~6 here). A run that never spreads
        # three times in a row is the engine's fault, not timing's.
        spread = []
        for attempt in range(3):
            out = tmp_path / f"{assembly}-{attempt}"
            report = run_merge(config(tiny_example, out, assembly=assembly),
                               executor=on(cluster))
            assert report.engine.assembly == assembly
            assert output_bytes(out) == expected
            spread.append({s.node_id for s in report.engine.shards})
            if spread[-1] == nodes:
                break
        assert spread[-1] == nodes, spread


def test_auto_assembles_a_local_output_on_the_driver(cluster, tiny_example, expected,
                                                    tmp_path):
    report = run_merge(config(tiny_example, tmp_path / "out"), executor=on(cluster))
    assert report.engine.assembly == "driver"
    assert report.engine.object_store_bytes == sum(f.size for f in report.outputs) - sum(
        8 + int.from_bytes(expected[f.name][:8], "little") for f in report.outputs)
    assert output_bytes(tmp_path / "out") == expected


def test_workers_upload_to_a_store_every_node_reaches(cluster, tiny_example, expected,
                                                      s3_prefix):
    report = run_merge(config(tiny_example, f"{s3_prefix}/out"), executor=on(cluster))
    assert report.engine.assembly == "workers" and report.engine.object_store_bytes == 0
    assert output_bytes(f"{s3_prefix}/out") == expected


def test_a_node_without_the_store_makes_the_driver_assemble(cluster, tiny_example, expected,
                                                            s3_prefix):
    """A node without the store's credentials or network path: it cannot read the driver's
    probe, so `auto` has the driver upload what the workers return."""
    report = run_merge(config(tiny_example, f"{s3_prefix}/out"), executor=on(cluster),
                       hidden=HiddenPath(cluster[1][0].node_id, s3_prefix))
    assert report.engine.assembly == "driver" and report.engine.object_store_bytes > 0
    assert len({s.node_id for s in report.engine.shards}) == 2
    assert output_bytes(f"{s3_prefix}/out") == expected


def test_workers_assembly_is_refused_naming_the_node(cluster, tiny_example, tmp_path):
    node = cluster[1][1].node_id
    with pytest.raises(InputError) as err:
        run_merge(config(tiny_example, tmp_path / "out", assembly="workers"),
                  executor=on(cluster), hidden=HiddenPath(node, str(tmp_path)))
    assert node[:12] in str(err.value) and str(tmp_path / "out") in str(err.value)
    assert "--assembly driver" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []  # no output, no staging, no probe left


def test_an_input_a_node_cannot_read_is_refused_before_compute(cluster, tiny_example,
                                                               tmp_path):
    node = cluster[1][0].node_id
    with pytest.raises(InputError, match="cannot read the input") as err:
        run_merge(config(tiny_example, tmp_path / "out"), executor=on(cluster),
                  hidden=HiddenPath(node, tiny_example[1][1]))
    assert node[:12] in str(err.value) and tiny_example[1][1] in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_file_the_driver_cannot_see_is_never_committed(cluster, tiny_example, tmp_path):
    fault = Fault(shard=1, kind="lose", marker=str(tmp_path / "lost"))
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="not found by the driver"):
        run_merge(config(tiny_example, out, assembly="workers"), executor=on(cluster),
                  fault=fault)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if "merge-staging" in n]


def test_a_node_killed_mid_merge_is_survived(cluster, tiny_example, expected, tmp_path):
    nodes, workers = cluster
    marker = tmp_path / "stalled"
    fault = Fault(shard=0, kind="stall", marker=str(marker))
    result: dict = {}

    def merge():
        try:
            result["report"] = run_merge(config(tiny_example, tmp_path / "out"),
                                         executor=on(cluster), fault=fault)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=merge)
    thread.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the stalled shard never started"
    victim = next(w for w in workers if w.node_id in marker.read_text())
    nodes.remove_node(victim)
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    survivor = next(w for w in workers if w is not victim).node_id
    assert {s.node_id for s in result["report"].engine.shards} == {survivor}
    assert output_bytes(tmp_path / "out") == expected
