"""Shared fixtures: a small example model set and one embedded Ray cluster for the session."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from s3_server import free_port, point_s3_at, running_s3_server

os.environ.setdefault("MERGE_PIPELINE_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# Every s3:// URI in the tests goes to a local S3 server (`s3_server`), never to the network.
# Set before any Ray cluster starts, so Ray workers inherit it too.
S3_PORT = free_port()
point_s3_at(S3_PORT)


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 (installed by the README's test command),
    started once per session with a test bucket: yields "s3://bucket"."""
    with running_s3_server(S3_PORT, "merge-tests") as bucket:
        yield bucket


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh prefix in the test bucket for one test."""
    import uuid
    name = request.node.name[:40].replace("[", "-").strip("]")
    return f"{s3_server}/{name}-{uuid.uuid4().hex[:6]}"


def output_bytes(location) -> dict[str, bytes]:
    """Every file directly in an output (a local directory or an object-store prefix) except
    the report, which holds timings: what must be bit-identical between two merges."""
    from pipeline.io import storage
    location = str(location)
    return {name: storage.read_bytes(storage.join(location, name))
            for name in storage.list_names(location) if name != "merge_report.json"}


@contextlib.contextmanager
def ray_nodes(*nodes: dict, head: dict | None = None):
    """Several Ray nodes on this machine (`ray.cluster_utils.Cluster`): a head that runs no work
    unless `head` says otherwise, and one node per `nodes` entry (its resources); yields the
    cluster and the added nodes. The session's embedded Ray is shut down first (the
    `ray_cluster` fixture starts it again when a later test needs it)."""
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=head or {"num_cpus": 0})
    try:
        added = [cluster.add_node(**resources) for resources in nodes]
        cluster.wait_for_nodes()
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_example(tmp_path_factory):
    """A CLIP-style ViT (HF key layout, tiny width) base + 3 fine-tuned checkpoints."""
    from pipeline.bench.examples import write_example
    root = tmp_path_factory.mktemp("tiny_example")
    return write_example(str(root), "tiny", num_tasks=3)


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """The `tiny` benchmark suite, built once per session: (directory, cache root, seconds)."""
    from pipeline.bench.suites.build import ensure_suite
    cache = str(tmp_path_factory.mktemp("suite_cache"))
    t0 = time.perf_counter()
    path = ensure_suite("tiny", cache, log=lambda *_: None)
    return path, cache, time.perf_counter() - t0


def _start_ray():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    ray = _start_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """An embedded local Ray with 3 logical CPUs, so 1, 2 and 3 workers can all run; started
    once per session, and again if a test (a CLI run in this process, say) shut it down."""
    import ray
    if not ray.is_initialized():
        _start_ray()
    return ray
