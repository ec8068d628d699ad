"""The work of one shard: read its own tensors, merge them, write its files, report a manifest.

This function is the whole worker. The in-process path calls it in a loop and the Ray engine
calls it as a task; both therefore produce the same bytes. It is idempotent: every file is
written under a temporary name and renamed, so a retried shard simply rewrites its files.
Only a small JSON-able manifest goes back to the driver, never tensors.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.engine.plan import MergeUnit, OutputMode, Shard
from pipeline.engine.records import ShardManifest, ShardSeconds, TensorLayout, WrittenFile
from pipeline.errors import InputError, TransientError
from pipeline.io.output import done_marker, write_json_atomic
from pipeline.io.reader import Checkpoint, open_checkpoint
from pipeline.io.safetensors_io import DTYPES, write_stream
from pipeline.methods import DEFAULT_EXCLUDE, MethodSpec, compress_key, merge_key, numerics_log


@dataclass(frozen=True)
class MergeSettings:
    """Everything about *how* to merge that every shard must agree on."""

    method: str
    params: dict[str, Any]
    alpha: float
    mode: OutputMode = "model"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    compute_dtype: str = "F32"
    device: str = "cpu"
    threads: int = 1


@dataclass(frozen=True)
class Fault:
    """A fault to inject once (tests of retries): 'raise' a transient error or 'exit' the
    worker process mid-shard. The marker file makes it fire only on the first attempt."""

    shard: int
    kind: str
    marker: str


@dataclass(frozen=True)
class ShardJob:
    """One shard's whole work order. It carries the method itself, not its name, so a method
    registered outside this package runs on workers that never imported its module."""

    shard: Shard
    base: str
    finetuned: tuple[str, ...]
    settings: MergeSettings
    method: MethodSpec
    out_dir: str
    statistics: dict[str, Any] = field(default_factory=dict)
    fault: Fault | None = None


@dataclass
class _Counters:
    bytes_read: int = 0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0


def _prepare(settings: MergeSettings) -> torch.device:
    # Thread count changes SVD bits; Ray reuses workers, so set it on every call.
    torch.set_num_threads(settings.threads)
    return torch.device(settings.device)


def _read_unit(ckpt: Checkpoint, unit: MergeUnit, counters: _Counters) -> torch.Tensor:
    """The unit as the math sees it: sources concatenated on dim 0 and, for a `transposed`
    unit, turned into open_clip's orientation (contiguous, so the SVDs see the same memory
    layout, and so the same bits, as for the open_clip checkpoint itself)."""
    start = time.perf_counter()
    parts = [ckpt.read(key) for key in unit.sources]
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if unit.is_float and not bool(torch.isfinite(tensor).all()):
        bad = next(k for k, p in zip(unit.sources, parts) if not bool(torch.isfinite(p).all()))
        raise InputError(f"{ckpt.location}: key {bad!r} contains NaN or Inf")
    counters.bytes_read += tensor.numel() * tensor.element_size()
    if unit.transposed:
        tensor = tensor.T.contiguous()
    counters.read_s += time.perf_counter() - start
    return tensor


def iter_unit_deltas(job: ShardJob, counters: _Counters, floats_only: bool = False
                     ) -> Generator[tuple[MergeUnit, torch.Tensor, torch.Tensor | None],
                                    None, None]:
    """(unit, base tensor, stacked task vectors in the compute dtype on the compute device)
    for every unit of the shard, in plan order and in the unit's orientation (`_read_unit`);
    task vectors are None for integer buffers."""
    device = _prepare(job.settings)
    compute = DTYPES[job.settings.compute_dtype]
    base = open_checkpoint(job.base)
    tuned = [open_checkpoint(path) for path in job.finetuned]
    try:
        for planned in job.shard.files:
            for unit in planned.units:
                if not unit.is_float:
                    if not floats_only:
                        yield unit, _read_unit(base, unit, counters), None
                    continue
                theta0 = _read_unit(base, unit, counters)
                theta0_c = theta0.to(device=device, dtype=compute)
                deltas = torch.stack([_read_unit(c, unit, counters).to(device=device,
                                                                       dtype=compute) - theta0_c
                                      for c in tuned])
                yield unit, theta0_c, deltas
    finally:
        for ckpt in [base, *tuned]:
            ckpt.close()


def _unit_outputs(job: ShardJob, unit: MergeUnit, theta0: torch.Tensor,
                  deltas: torch.Tensor | None) -> dict[str, torch.Tensor]:
    settings, method = job.settings, job.method
    if deltas is None:  # integer buffer: copied from the base
        return _split_to_sources(unit, theta0)
    if settings.mode == "compressed":
        parts = compress_key(method, unit.name, deltas, settings.params, settings.exclude)
        return {f"{unit.name}::{name}": t.cpu() for name, t in parts.items()}
    tau = merge_key(method, unit.name, deltas, settings.params, settings.exclude,
                    job.statistics)
    if settings.mode == "model":  # cast to the planned dtype on write (`run_shard`)
        tau = theta0 + settings.alpha * tau
    return _split_to_sources(unit, tau.cpu())


def _split_to_sources(unit: MergeUnit, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A unit's result under its stored keys and in their stored layout (a fused q/k/v
    result splits back in three; a transposed unit turns back)."""
    if not unit.shape:
        return {unit.sources[0]: tensor}
    if unit.transposed:
        tensor = tensor.T.contiguous()
    return dict(zip(unit.sources, tensor.split(list(unit.rows))))


def run_shard(job: ShardJob) -> ShardManifest:
    """Merge one shard and write its files into `job.out_dir`; return its manifest."""
    started = time.perf_counter()
    counters = _Counters()
    files = []
    with numerics_log() as log:
        units = iter_unit_deltas(job, counters)
        for planned in job.shard.files:
            outputs: dict[str, torch.Tensor] = {}
            for _ in planned.units:
                unit, theta0, deltas = next(units)
                t0 = time.perf_counter()
                outputs.update(_unit_outputs(job, unit, theta0, deltas))
                counters.compute_s += time.perf_counter() - t0
            _maybe_fail(job)
            t0 = time.perf_counter()
            written = write_stream(os.path.join(job.out_dir, planned.name), planned.layout,
                                   ((key, outputs.pop(key).to(DTYPES[dtype]))
                                    for key, dtype, _ in planned.layout),
                                   {"format": "pt"})
            counters.write_s += time.perf_counter() - t0
            files.append(WrittenFile(
                name=written.name, size=written.size, sha256=written.sha256,
                tensors={k: TensorLayout(dtype=d, shape=list(s)) for k, d, s in planned.layout}))
            write_json_atomic(done_marker(job.out_dir, written.name),
                              files[-1].model_dump(mode="json"))
        units.close()
    return ShardManifest(
        shard=job.shard.index, files=files, units=sum(len(f.units) for f in job.shard.files),
        cost_estimate_s=round(job.shard.cost, 3), node=socket.gethostname(), pid=os.getpid(),
        device=job.settings.device, bytes_read=counters.bytes_read,
        seconds=ShardSeconds(total=round(time.perf_counter() - started, 4),
                             read=round(counters.read_s, 4),
                             compute=round(counters.compute_s, 4),
                             write=round(counters.write_s, 4), svd=round(log.svd_seconds, 4)),
        svd_calls=log.svd_calls, numerics=log.events,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _maybe_fail(job: ShardJob) -> None:
    fault = job.fault
    if fault is None or fault.shard != job.shard.index or os.path.exists(fault.marker):
        return
    with open(fault.marker, "w") as f:
        f.write(f"fired in pid {os.getpid()}\n")
    if fault.kind == "exit":
        os._exit(17)
    raise TransientError(f"injected transient failure in shard {job.shard.index}")


# -- model-wide statistics (method hooks) ----------------------------------------------------
def shard_statistics(job: ShardJob, request: Any) -> Any:
    """This shard's partial answer to one pass of its method's model-wide statistics."""
    assert job.method.statistics is not None
    deltas = (d for _, _, d in iter_unit_deltas(job, _Counters(), floats_only=True)
              if d is not None)
    return job.method.statistics.shard_pass(deltas, request)
