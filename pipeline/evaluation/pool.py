"""A pool of evaluators: Ray actors (one per GPU, or per CPU slot), or one in-process.

The driver turns each request (weights, task, split) into fixed shards of whole batches, sends
them to whichever evaluator is free (preferring one that already holds those weights, so a
sweep does not rewrite parameters per shard), and sums the counts per request. Actors are
restartable: if one dies mid-sweep, Ray restarts it (it reloads theta_0) and re-runs the call
that was in flight; counts are integers summed per request, so the result is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluation.evaluator import EVAL_BATCH, Evaluator, RowRange, check_heads
from pipeline.evaluation.tasks import EvalTask
from pipeline.models.weights import Weights
from pipeline.runtime.executors import choose_device, progress, ray_slots, stream_results
from pipeline.runtime.ray_cluster import connect

Request = tuple[Weights, str, str]  # (weights, task, split)
# Shards are whole batches (so counts never depend on the sharding) and sized per call: small
# enough for every evaluator to get several (balance), large enough that the first batch of a
# shard, decoded before the model can start, is a small part of it.
MAX_SHARD_ROWS = 8 * EVAL_BATCH
SHARDS_PER_EVALUATOR = 4
# Calls in flight per actor: one on the model, the next one reading and decoding its rows.
CALLS_PER_ACTOR = 2
MAX_RESTARTS = 3


def plan_shards(task: str, split: str, rows: int, shard_rows: int) -> list[RowRange]:
    shard_rows = max(EVAL_BATCH, shard_rows - shard_rows % EVAL_BATCH)
    return [RowRange(task, split, i, min(rows, i + shard_rows)) for i in range(0, rows, shard_rows)]


def shard_size(total_rows: int, evaluators: int) -> int:
    """Rows per shard for a call over `total_rows`: SHARDS_PER_EVALUATOR shards for each
    evaluator, in whole batches, at most MAX_SHARD_ROWS."""
    target = -(-total_rows // (SHARDS_PER_EVALUATOR * evaluators))
    return min(MAX_SHARD_ROWS, max(EVAL_BATCH, -(-target // EVAL_BATCH) * EVAL_BATCH))


class EvaluationPool:
    def __init__(self, base: str, tasks: Sequence[EvalTask], engine: str = "ray",
                 workers: int | None = None, device: str = "auto", threads: int = 1,
                 gpus_per_actor: float = 1.0, address: str | None = None,
                 shard_rows: int | None = None, preprocess: str = "auto",
                 precision: str = "fp32"):
        self.tasks = {t.name: t for t in tasks}
        check_heads(base, tasks)  # before any evaluator loads the model
        self.shard_rows = shard_rows
        self.engine = engine
        self.precision = precision
        if engine == "local":
            import torch
            dev = choose_device(device, torch.cuda.is_available())
            self._local = Evaluator(base, self.tasks, preprocess, dev, threads, precision)
            self.workers, self.device = 1, dev
            return
        import ray

        self.cluster = connect(address)  # the same start-up as the merge executor's
        self.device, available = ray_slots(device, threads, gpus_per_actor)
        options = (dict(num_cpus=1, num_gpus=gpus_per_actor) if self.device == "cuda" else
                   dict(num_cpus=threads, num_gpus=0))
        self.workers = max(1, min(workers or available, available or 1))
        actor_cls = ray.remote(Evaluator).options(max_restarts=MAX_RESTARTS,
                                                  max_task_retries=MAX_RESTARTS,
                                                  max_concurrency=CALLS_PER_ACTOR, **options)
        # The tasks (heads, row plans: no images) go to the object store once for all actors.
        # The pool keeps the reference: a restarted actor re-runs its constructor with the
        # same arguments, and an object nobody references any more is gone by then.
        self._tasks_ref = ray.put(self.tasks)
        self.actors: list[Any] = [actor_cls.remote(base, self._tasks_ref, preprocess,
                                                   self.device, threads, precision)
                                  for _ in range(self.workers)]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.engine, "evaluators": self.workers, "device": self.device,
                "shard_rows": self.shard_rows or "auto", "batch": EVAL_BATCH,
                "precision": self.precision}

    def actor_pids(self) -> list[int]:
        import ray
        return ray.get([a.pid.remote() for a in self.actors])

    def counts(self, requests: Sequence[Request], desc: str = "evaluate"
               ) -> list[tuple[int, int]]:
        """(correct, total) per request, identical whatever the number of evaluators."""
        for _, task, split in requests:
            if task not in self.tasks or split not in self.tasks[task].splits:
                raise PipelineError(f"no data for task {task!r} split {split!r}")
        rows = [self.tasks[task].splits[split].num_rows for _, task, split in requests]
        size = self.shard_rows or shard_size(sum(rows), self.workers)
        items = [(r, weights, shard) for r, (weights, task, split) in enumerate(requests)
                 for shard in plan_shards(task, split, rows[r], size)]
        totals = [[0, 0] for _ in requests]
        with progress(len(items), desc) as bar:
            for r, (correct, total) in self._run(items, bar):
                totals[r][0] += correct
                totals[r][1] += total
        return [(c, t) for c, t in totals]

    def _run(self, items, bar):
        if self.engine == "local":
            for r, weights, shard in items:
                yield r, self._local.count(weights, shard)
                bar.update(1)
            return
        queue = list(items)
        holding: dict[int, Weights | None] = {i: None for i in range(len(self.actors))}
        idle = [a for _ in range(CALLS_PER_ACTOR) for a in range(len(self.actors))]

        def submit_next():
            if not (idle and queue):
                return None
            a = idle.pop(0)
            # Prefer work on the weights this actor already holds.
            pick = next((i for i, it in enumerate(queue) if it[1] == holding[a]), 0)
            r, weights, shard = queue.pop(pick)
            holding[a] = weights
            ref = self.actors[a].count.remote(weights, shard)
            return ref, (a, r)

        for (a, r), counts in stream_results(submit_next, len(idle), bar,
                                             force_cancel=False):
            idle.append(a)
            yield r, counts

    def close(self) -> None:
        if self.engine != "local":
            import ray
            for actor in self.actors:
                ray.kill(actor)
