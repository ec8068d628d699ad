"""Where shard functions run: in this process, or as Ray tasks across a cluster.

Both executors have one method, `map(fn, argument_tuples)`, returning results in argument order
whatever order the work finished in (so the driver's view is deterministic). The Ray executor
keeps at most `workers` tasks in flight, starting the costliest shards first, and shows a
progress bar with an ETA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from pipeline.errors import PipelineError, TransientError
from pipeline.runtime.interrupts import received_signal, reraise_if_interrupted
from pipeline.runtime.ray_cluster import connect

# Ray's default retries crashed workers but not exceptions. We retry crashes and errors that a
# second attempt can fix (I/O hiccups, injected faults), never input errors.
RETRYABLE = (TransientError, OSError, ConnectionError, TimeoutError)
MAX_RETRIES = 3


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, leave=False,
                disable=os.environ.get("MERGE_PIPELINE_PROGRESS", "1") == "0")


def choose_device(device: str, gpu_available: bool) -> str:
    """"cuda" when asked for, or on "auto" where a GPU is there; else "cpu"."""
    return "cuda" if device == "cuda" or (device == "auto" and gpu_available) else "cpu"


class LocalExecutor:
    """Runs every shard in this process, one after another (no Ray)."""

    workers = 1
    device = "cpu"
    description = "local (in-process)"
    startup_s = 0.0

    def __init__(self, device: str = "auto"):
        import torch
        self.device = choose_device(device, torch.cuda.is_available())

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = "") -> list[Any]:
        import torch
        threads = torch.get_num_threads()  # shards set their own; give the caller's back
        results = []
        try:
            with progress(len(calls), desc) as bar:
                for args in calls:
                    results.append(fn(*args))
                    bar.update(1)
                    reraise_if_interrupted()
        finally:
            torch.set_num_threads(threads)
        return results

    def info(self) -> dict[str, Any]:
        return {"kind": "local", "workers": 1, "device": self.device, "startup_s": 0.0}


class RayExecutor:
    """Runs shards as Ray tasks; starts an embedded local cluster when no address is given
    (sized from the CPUs this process may use; see `ray_cluster.connect`)."""

    def __init__(self, address: str | None = None, workers: int | None = None,
                 threads: int = 1, device: str = "auto", gpus_per_task: float = 1.0):
        import ray

        self.cluster = connect(address)  # fails fast, in one line, on an unreachable address
        self.startup_s = self.cluster.startup_s  # Ray start-up (or joining), for the report
        self.embedded = self.cluster.embedded
        self.device, available = ray_slots(device, threads, gpus_per_task)
        self.threads = threads
        self.gpus_per_task = gpus_per_task if self.device == "cuda" else 0
        self.workers = max(1, workers or available)
        self._remote: dict[Callable, Any] = {}
        self.ray_version = ray.__version__

    def _remote_fn(self, fn: Callable) -> Any:
        import ray
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn).options(
                num_cpus=self.threads, num_gpus=self.gpus_per_task, max_retries=MAX_RETRIES,
                retry_exceptions=list(RETRYABLE))
        return self._remote[fn]

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = "") -> list[Any]:
        remote = self._remote_fn(fn)
        results: list[Any] = [None] * len(calls)
        queue = list(range(len(calls)))

        def submit_next() -> tuple[Any, int] | None:
            if not queue:
                return None
            i = queue.pop(0)
            return remote.remote(*calls[i]), i

        with progress(len(calls), desc) as bar:
            for i, result in stream_results(submit_next, self.workers, bar):
                results[i] = result
        return results

    def info(self) -> dict[str, Any]:
        return {"kind": "ray", "workers": self.workers, "device": self.device,
                "threads_per_worker": self.threads, "gpus_per_task": self.gpus_per_task,
                "ray_version": self.ray_version, "startup_s": round(self.startup_s, 4),
                "embedded_cluster": self.embedded}


def ray_slots(device: str, threads: int, gpu_share: float) -> tuple[str, int]:
    """The device work will run on, and how many tasks or actors of `threads` CPUs (or
    `gpu_share` of a GPU) the connected cluster runs at once: merge shards and evaluation
    actors are sized alike."""
    import ray
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    chosen = choose_device(device, gpus > 0)
    if chosen == "cuda":
        return chosen, int(gpus / gpu_share) if gpus else 0
    return chosen, int(resources.get("CPU", 1) // threads)


def stream_results(submit_next: Callable[[], tuple[Any, Any] | None], capacity: int,
                   bar: tqdm, force_cancel: bool = True) -> Iterator[tuple[Any, Any]]:
    """The one Ray submission loop (merge shards and evaluation actors alike): keep up to
    `capacity` calls in flight, each submitted by `submit_next()` as (object ref, tag), or None
    when there is nothing to submit now; yield (tag, result) as results arrive, our own errors
    unwrapped. Submission resumes after each yield, so a caller can free capacity (an idle
    actor) in between. On an error the calls in flight are cancelled (`force_cancel` for
    tasks; actor calls cannot be forced)."""
    import ray
    pending: dict[Any, Any] = {}
    try:
        while True:
            while len(pending) < capacity and (call := submit_next()) is not None:
                pending[call[0]] = call[1]
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            reraise_if_interrupted()
            for ref in done:
                tag = pending.pop(ref)
                result = _get(ref)
                bar.update(1)
                yield tag, result
    except BaseException:
        # On Ctrl-C/SIGTERM the process is going down: shutting the embedded cluster down, or
        # the job's end on a joined one, stops the calls. ray.cancel would race calls that are
        # finishing into a Ray CHECK failure that kills the driver with a C++ stack trace (seen
        # in 2 of 6 interrupted runs; ray-project/ray #54798, #54846), so it is for errors only.
        if received_signal() is None:
            for ref in pending:
                ray.cancel(ref, force=force_cancel)
        raise


def _get(ref: Any) -> Any:
    """ray.get, but our own errors come back as themselves, with their one-line message."""
    import ray
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, PipelineError):
            raise err.cause from None
        raise


def make_executor(engine: str, address: str | None, workers: int | None, threads: int,
                  device: str, gpus_per_task: float):
    if engine == "local":
        return LocalExecutor(device)
    return RayExecutor(address, workers, threads, device, gpus_per_task)
