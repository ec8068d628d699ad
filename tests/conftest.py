"""Shared fixtures: a small example model set and one embedded Ray cluster for the session."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("MERGE_PIPELINE_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
