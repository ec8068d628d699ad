"""The work of one shard: read its own tensors, merge them, write its files, report a manifest.

This function is the whole worker. The in-process path calls it in a loop and the Ray engine
calls it as a task; both therefore produce the same bytes. It is idempotent: every file
appears only when whole (`storage.open_output`), so a retried shard simply rewrites its files.
With `out_dir` set (`--assembly workers`) it writes its files there (a local directory every
node sees, or an object-store prefix) and only a small manifest goes back to the driver; with
`out_dir` None (`--assembly driver`) it returns each tensor's bytes as numpy arrays, which
Ray's object store hands to the driver without a copy, and the driver writes the files.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.engine.plan import MergeUnit, OutputMode, PlannedFile, Shard
from pipeline.engine.records import (
    DoneMarker,
    InputDigests,
    ShardManifest,
    ShardSeconds,
    TensorLayout,
    WrittenFile,
)
from pipeline.errors import InputError, TransientError
from pipeline.io import safetensors_io
from pipeline.io.output import done_marker, write_json_atomic
from pipeline.io.reader import Checkpoint, open_checkpoint
from pipeline.io.safetensors_io import DTYPES, tensor_bytes, write_stream
from pipeline.io.scan import tensor_sha256
from pipeline.io.storage import join, remove
from pipeline.methods import DEFAULT_EXCLUDE, MethodSpec, compress_key, merge_key, numerics_log
from pipeline.runtime.executors import current_node_id


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
    """A fault to inject once (tests of retries and of storage the driver cannot see):
    'raise' a transient error, 'exit' the worker process mid-shard, 'stall' for a minute
    (a node can be killed under it), or 'lose' the shard's files after writing them (as if
    they went to the worker's own disk). The marker file makes it fire only on the first
    attempt."""

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
    out_dir: str | None  # None: return the tensors to the driver (`--assembly driver`)
    statistics: dict[str, Any] = field(default_factory=dict)
    fault: Fault | None = None
    # Hash every input tensor as it is read (the report's input digests, the duplicate-task
    # check, --resume's input check): the merge's one read of the inputs serves all of them.
    hash_inputs: bool = True


@dataclass(frozen=True)
class ShardResult:
    """What a shard hands back: its manifest and, when the driver assembles the files, each
    file's tensor bytes in planned order (numpy arrays travel through Ray's object store
    without a copy); empty when the worker wrote its files itself."""

    manifest: ShardManifest
    tensors: dict[str, list[np.ndarray]] = field(default_factory=dict)


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


def _read_unit(ckpt: Checkpoint, unit: MergeUnit, counters: _Counters,
               digests: dict[str, str] | None = None) -> torch.Tensor:
    """The unit as the math sees it: sources concatenated on dim 0 and, for a `transposed`
    unit, turned into open_clip's orientation (contiguous, so the SVDs see the same memory
    layout, and so the same bits, as for the open_clip checkpoint itself). With `digests`,
    each source's stored bytes are hashed into it first (reading time includes hashing)."""
    start = time.perf_counter()
    parts = [ckpt.read(key) for key in unit.sources]
    if digests is not None:
        digests.update((key, tensor_sha256(part)) for key, part in zip(unit.sources, parts))
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if unit.is_float and not bool(torch.isfinite(tensor).all()):
        bad = next(k for k, p in zip(unit.sources, parts) if not bool(torch.isfinite(p).all()))
        raise InputError(f"{ckpt.location}: key {bad!r} contains NaN or Inf")
    counters.bytes_read += tensor.numel() * tensor.element_size()
    if unit.transposed:
        tensor = tensor.T.contiguous()
    counters.read_s += time.perf_counter() - start
    return tensor


def iter_unit_deltas(job: ShardJob, counters: _Counters, floats_only: bool = False,
                     digests: dict[str, InputDigests] | None = None
                     ) -> Generator[tuple[MergeUnit, torch.Tensor, torch.Tensor | None],
                                    None, None]:
    """(unit, base tensor, stacked task vectors in the compute dtype on the compute device)
    for every unit of the shard, in plan order and in the unit's orientation (`_read_unit`);
    task vectors are None for integer buffers.

    With `digests` (a merge, never a statistics pass) every input tensor the plan gives this
    shard is hashed into digests[file][checkpoint], including those the math does not need
    (the fine-tunes' integer buffers, a file's `hashed_only` units): each is read once in all.
    """
    device = _prepare(job.settings)
    compute = DTYPES[job.settings.compute_dtype]
    base = open_checkpoint(job.base)
    tuned = [open_checkpoint(path) for path in job.finetuned]

    def sink(planned: PlannedFile, ckpt: Checkpoint) -> dict[str, str] | None:
        if digests is None:
            return None
        return digests.setdefault(planned.name, {}).setdefault(ckpt.location, {})

    try:
        for planned in job.shard.files:
            if digests is not None:  # first: a generator closed after a file's last unit
                for unit in planned.hashed_only:  # would never come back to them
                    for ckpt in [base, *tuned]:
                        _read_unit(ckpt, unit, counters, sink(planned, ckpt))
            for unit in planned.units:
                if not unit.is_float:
                    if digests is not None:  # copied from the base, hashed everywhere
                        for ckpt in tuned:
                            _read_unit(ckpt, unit, counters, sink(planned, ckpt))
                    if not floats_only:
                        yield unit, _read_unit(base, unit, counters, sink(planned, base)), None
                    continue
                theta0 = _read_unit(base, unit, counters, sink(planned, base))
                theta0_c = theta0.to(device=device, dtype=compute)
                deltas = torch.stack([_read_unit(c, unit, counters, sink(planned, c))
                                      .to(device=device, dtype=compute) - theta0_c
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


def run_shard(job: ShardJob) -> ShardResult:
    """Merge one shard; write its files into `job.out_dir`, or return them (`ShardResult`)."""
    started = time.perf_counter()
    counters = _Counters()
    files, returned = [], {}
    digests: dict[str, InputDigests] | None = {} if job.hash_inputs else None
    with numerics_log() as log:
        units = iter_unit_deltas(job, counters, digests=digests)
        for planned in job.shard.files:
            outputs: dict[str, torch.Tensor] = {}
            for _ in planned.units:
                unit, theta0, deltas = next(units)
                t0 = time.perf_counter()
                outputs.update(_unit_outputs(job, unit, theta0, deltas))
                counters.compute_s += time.perf_counter() - t0
            _maybe_fail(job)
            t0 = time.perf_counter()
            ordered = ((key, outputs.pop(key).to(DTYPES[dtype]))
                       for key, dtype, _ in planned.layout)
            if job.out_dir is None:
                returned[planned.name] = [np.asarray(tensor_bytes(t)) for _, t in ordered]
            else:
                files.append(_write_file(job, planned, ordered,
                                         (digests or {}).get(planned.name, {})))
            counters.write_s += time.perf_counter() - t0
        units.close()
    manifest = ShardManifest(
        shard=job.shard.index, files=files, units=sum(len(f.units) for f in job.shard.files),
        cost_estimate_s=round(job.shard.cost, 3), node=socket.gethostname(),
        node_id=current_node_id(), pid=os.getpid(), device=job.settings.device,
        bytes_read=counters.bytes_read,
        returned_bytes=sum(a.nbytes for arrays in returned.values() for a in arrays),
        seconds=ShardSeconds(total=round(time.perf_counter() - started, 4),
                             read=round(counters.read_s, 4),
                             compute=round(counters.compute_s, 4),
                             write=round(counters.write_s, 4), svd=round(log.svd_seconds, 4)),
        svd_calls=log.svd_calls, numerics=log.events, input_digests=digests or {},
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_device_bytes=(torch.cuda.max_memory_allocated()
                           if job.settings.device == "cuda" else None))
    return ShardResult(manifest, returned)


def _write_file(job: ShardJob, planned: PlannedFile, tensors: Iterator[tuple[str, torch.Tensor]],
                inputs: InputDigests) -> WrittenFile:
    """Stream one planned file into the output's staging location, with its done-marker (its
    manifest and input digests, checked again by --resume)."""
    assert job.out_dir is not None
    written = write_stream(join(job.out_dir, planned.name), planned.layout, tensors,
                           {"format": "pt"})
    record = mark_done(job.out_dir, planned, written, inputs)
    if _fault_fires(job, "lose"):
        remove(join(job.out_dir, planned.name))
    return record


def planned_tensors(planned: PlannedFile) -> dict[str, TensorLayout]:
    """A planned file's tensors as its written record and its done-marker list them."""
    return {k: TensorLayout(dtype=d, shape=list(s)) for k, d, s in planned.layout}


def mark_done(directory: str, planned: PlannedFile, written: safetensors_io.WrittenFile,
              inputs: InputDigests) -> WrittenFile:
    """The record of a file just written into `directory` (by a worker or by the assembling
    driver); its done-marker beside it adds the digests of the input tensors it came from,
    which --resume checks again."""
    record = WrittenFile(name=written.name, size=written.size, sha256=written.sha256,
                         tensors=planned_tensors(planned))
    marker = DoneMarker(**record.model_dump(), inputs=inputs)
    write_json_atomic(done_marker(directory, written.name), marker.model_dump(mode="json"))
    return record


def hash_inputs(wanted: dict[str, list[str]]) -> InputDigests:
    """sha256 of the named stored tensors of each checkpoint (location -> keys): what --resume
    compares with a reused file's done-marker, since no shard reads that file's inputs."""
    found: InputDigests = {}
    for location, keys in wanted.items():
        with open_checkpoint(location) as ckpt:
            found[location] = {key: tensor_sha256(ckpt.read(key)) for key in keys}
    return found


def _maybe_fail(job: ShardJob) -> None:
    for kind in ("raise", "exit", "stall"):
        if not _fault_fires(job, kind):
            continue
        if kind == "exit":
            os._exit(17)
        if kind == "stall":
            time.sleep(60)
            return
        raise TransientError(f"injected transient failure in shard {job.shard.index}")


def _fault_fires(job: ShardJob, kind: str) -> bool:
    """Whether this job's injected fault is `kind`, for this shard, on its first attempt."""
    fault = job.fault
    if (fault is None or fault.kind != kind or fault.shard != job.shard.index
            or os.path.exists(fault.marker)):
        return False
    with open(fault.marker, "w") as f:
        f.write(f"fired in pid {os.getpid()} on node {current_node_id() or 'local'}\n")
    return True


# -- model-wide statistics (method hooks) ----------------------------------------------------
def shard_statistics(job: ShardJob, request: Any) -> Any:
    """This shard's partial answer to one pass of its method's model-wide statistics."""
    assert job.method.statistics is not None
    deltas = (d for _, _, d in iter_unit_deltas(job, _Counters(), floats_only=True)
              if d is not None)
    return job.method.statistics.shard_pass(deltas, request)
