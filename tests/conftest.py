"""Shared fixtures: a small example model set and one embedded Ray cluster for the session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("MERGE_PIPELINE_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every s3:// URI in the tests goes to a local S3 server (`s3_bucket`), never to the network.
# Set before any Ray cluster starts, so Ray workers inherit it too.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="test",
                  AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
S3_BUCKET = "merge-tests"


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 (installed by the README's test command),
    started once per session, with the test bucket created; stopped at the end."""
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 server (moto_server) did not start")
                time.sleep(0.1)
        import pyarrow.fs as pafs
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http",
                          region="us-east-1", access_key="test", secret_key="test",
                          allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh prefix in the test bucket for one test."""
    import uuid
    return f"{s3_server}/{request.node.name[:40].replace('[', '-').strip(']')}-{uuid.uuid4().hex[:6]}"


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
