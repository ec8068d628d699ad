"""Where shard functions run: in this process, or as Ray tasks across a cluster.

Both executors offer `imap(fn, argument_tuples)`, yielding (index, result) as work finishes,
so a caller can consume results one at a time with bounded memory; `map`, which returns results
in argument order whatever order the work finished in (so the driver's view is deterministic);
and `each_node(fn, args)`, which runs a small function once on every node that runs work (the
driver's probes). The Ray executor keeps as many tasks in flight as the cluster has room for,
re-reading its size as an autoscaling cluster grows, and shows a progress bar with an ETA.
On its first use, the Ray executor warms every worker slot up in parallel (`_warm_import`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from pipeline.errors import InputError, PipelineError, TransientError
from pipeline.runtime.interrupts import received_signal, reraise_if_interrupted
from pipeline.runtime.ray_cluster import connect

# Ray's default retries crashed workers but not exceptions. We retry crashes and errors that a
# second attempt can fix (I/O hiccups, injected faults), never input errors.
RETRYABLE = (TransientError, OSError, ConnectionError, TimeoutError)
MAX_RETRIES = 3


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, leave=False,
                disable=os.environ.get("MERGE_PIPELINE_PROGRESS", "1") == "0")


# How often a Ray executor without a fixed --workers re-reads the cluster's size.
RESIZE_EVERY_S = 5.0
# How long an error waits for the cancelled calls in flight to end.
CANCEL_WAIT_S = 30.0


NO_LOCAL_CUDA = "this machine has no CUDA device that torch can use"


def choose_device(device: str, gpu_available: bool, missing: str = NO_LOCAL_CUDA) -> str:
    """"cuda" when asked for, or on "auto" where a GPU is there; else "cpu". Asking for cuda
    where there is none is the user's mistake, said in one line (`missing` says where)."""
    if device == "cuda" and not gpu_available:
        raise InputError(f"--device cuda: {missing}")
    return "cuda" if device == "cuda" or (device == "auto" and gpu_available) else "cpu"


def current_node_id() -> str:
    """The Ray node this code runs on, or "" outside a Ray worker (Ray is not imported for
    it: in-process merges never load Ray)."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return ""
    return sys.modules["ray"].get_runtime_context().get_node_id()


class Executor:
    """What both executors share: `map` is `imap` put back in argument order."""

    def imap(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = ""
             ) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = "") -> list[Any]:
        ordered: list[Any] = [None] * len(calls)
        for i, result in self.imap(fn, calls, desc):
            ordered[i] = result
        return ordered


class LocalExecutor(Executor):
    """Runs every shard in this process, one after another (no Ray)."""

    workers = 1
    device = "cpu"
    description = "local (in-process)"
    startup_s = 0.0

    def __init__(self, device: str = "auto"):
        import torch
        self.device = choose_device(device, torch.cuda.is_available())

    def imap(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = ""
             ) -> Iterator[tuple[int, Any]]:
        import torch
        threads = torch.get_num_threads()  # shards set their own; give the caller's back
        try:
            with progress(len(calls), desc) as bar:
                for i, args in enumerate(calls):
                    result = fn(*args)
                    bar.update(1)
                    reraise_if_interrupted()
                    yield i, result
        finally:
            torch.set_num_threads(threads)

    def each_node(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        return [fn(*args)]

    def info(self) -> dict[str, Any]:
        return {"kind": "local", "workers": 1, "device": self.device, "startup_s": 0.0}


class RayExecutor(Executor):
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
        self.fixed_workers = workers
        self.workers = max(1, workers or available)
        self._sized_at = time.monotonic()
        self._remote: dict[Callable, Any] = {}
        self._warmups: list[Any] = []  # object refs of the warm-up tasks (`_warm_up`)
        self._warmed = False
        self.ray_version = ray.__version__

    def capacity(self) -> int:
        """Tasks to keep in flight: --workers when given, else what the cluster has room for
        now, re-read every few seconds so that nodes an autoscaler adds get work."""
        if not self.fixed_workers and time.monotonic() - self._sized_at >= RESIZE_EVERY_S:
            _, available = ray_slots(self.device, self.threads, self.gpus_per_task or 1.0)
            self.workers, self._sized_at = max(1, available), time.monotonic()
        return self.workers

    def _options(self) -> dict[str, Any]:
        return dict(num_cpus=self.threads, num_gpus=self.gpus_per_task)

    def _remote_fn(self, fn: Callable) -> Any:
        import ray
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn).options(
                **self._options(), max_retries=MAX_RETRIES, retry_exceptions=list(RETRYABLE))
        return self._remote[fn]

    def _warm_up(self, fn: Callable) -> None:
        """Before the first tasks: one task per slot imports `fn`'s module (torch with it).

        A worker process imports a task's module on its first task: for the merge engine
        that is torch, 1.5-2 s on 2 cores. Ray prestarts one worker per CPU, but the first
        calls (one probe per node, then a few scans) reach the workers one after another, so
        each paid that import in turn. Submitted first, the warm-ups import in every worker
        at once, and the calls queue behind them. Fire and forget: a failed import is left
        to the real task to report."""
        if self._warmed:
            return
        self._warmed = True
        module = getattr(fn, "__module__", None)
        if not module or module == "__main__":  # a worker could not import it by name
            return
        import ray
        remote = ray.remote(_warm_import).options(**self._options(), max_retries=0)
        self._warmups = [remote.remote(module) for _ in range(self.capacity())]

    def warmup_seconds(self) -> float | None:
        """The slowest finished warm-up import (seconds), None when none has finished."""
        import ray
        if not self._warmups:
            return None
        try:
            done, _ = ray.wait(self._warmups, num_returns=len(self._warmups), timeout=0)
        except Exception:  # Ray shut down since
            return None
        seconds = []
        for ref in done:
            with contextlib.suppress(Exception):  # a worker that died under it
                seconds.append(ray.get(ref))
        found = [s for s in seconds if s is not None]
        return max(found) if found else None

    def imap(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str = ""
             ) -> Iterator[tuple[int, Any]]:
        self._warm_up(fn)
        remote = self._remote_fn(fn)
        queue = list(range(len(calls)))

        def submit_next() -> tuple[Any, int] | None:
            if not queue:
                return None
            i = queue.pop(0)
            return remote.remote(*calls[i]), i

        with progress(len(calls), desc) as bar:
            yield from stream_results(submit_next, self.capacity, bar)

    def each_node(self, fn: Callable[..., Any], args: tuple) -> list[Any]:
        """`fn(*args)` once on every alive node with room for one of this executor's tasks
        (CPUs, or GPUs on a GPU run), pinned there, with the same resources a task gets, so a
        GPU probe sees the GPU its shards will see."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        self._warm_up(fn)
        need = self._options()
        nodes = [n for n in ray.nodes() if n.get("Alive")
                 and n["Resources"].get("CPU", 0) >= need["num_cpus"]
                 and n["Resources"].get("GPU", 0) >= need["num_gpus"]]
        remote = ray.remote(fn)
        refs = [remote.options(**need, max_retries=0, scheduling_strategy=(
                    NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))).remote(*args)
                for node in nodes]
        return [_get(ref) for ref in refs]

    def info(self) -> dict[str, Any]:
        info = {"kind": "ray", "workers": self.workers, "device": self.device,
                "threads_per_worker": self.threads, "gpus_per_task": self.gpus_per_task,
                "ray_version": self.ray_version, "startup_s": round(self.startup_s, 4),
                "embedded_cluster": self.embedded}
        warmup = self.warmup_seconds()
        if warmup is not None:
            info["worker_import_s"] = round(warmup, 4)
        return info


def _warm_import(module: str) -> float | None:
    """A warm-up task (`RayExecutor._warm_up`): import `module` in this worker; the seconds it
    took, or None if it failed (never raises: nobody waits for this task's result)."""
    t0 = time.perf_counter()
    try:
        importlib.import_module(module)
    except Exception:
        return None
    return time.perf_counter() - t0


def ray_slots(device: str, threads: int, gpu_share: float) -> tuple[str, int]:
    """The device work will run on, and how many tasks or actors of `threads` CPUs (or
    `gpu_share` of a GPU) the connected cluster runs at once: merge shards and evaluation
    actors are sized alike."""
    import ray
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    chosen = choose_device(device, gpus > 0, f"the Ray cluster has no GPUs (its resources: "
                                             f"{int(resources.get('CPU', 0))} CPUs, 0 GPUs)")
    if chosen == "cuda":
        return chosen, int(gpus / gpu_share)
    return chosen, int(resources.get("CPU", 1) // threads)


def stream_results(submit_next: Callable[[], tuple[Any, Any] | None],
                   capacity: int | Callable[[], int], bar: tqdm, force_cancel: bool = True
                   ) -> Iterator[tuple[Any, Any]]:
    """The one Ray submission loop (merge shards and evaluation actors alike): keep up to
    `capacity` (a number, or a function re-asked before each submission) calls in flight,
    each submitted by `submit_next()` as (object ref, tag), or None
    when there is nothing to submit now; yield (tag, result) as results arrive, our own errors
    unwrapped. Submission resumes after each yield, so a caller can free capacity (an idle
    actor) in between. On an error the calls in flight are cancelled (`force_cancel` for
    tasks; actor calls cannot be forced)."""
    import ray
    pending: dict[Any, Any] = {}
    room = capacity if callable(capacity) else (lambda: capacity)
    try:
        while True:
            while len(pending) < room() and (call := submit_next()) is not None:
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
        if received_signal() is None and pending:
            for ref in pending:
                ray.cancel(ref, force=force_cancel)
            # Let them end before the caller cleans up: a cancelled task still running could
            # write into a staging directory just removed (seen on a loaded 2-core machine).
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
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
