"""The driver: validate, plan, probe the nodes, run shards on an executor, commit the output.

Every tensor is read and merged by the shard that owns it (`engine.worker.run_shard`), which
hashes each input tensor as it reads it: every input byte is read once per merge, and the
report's input digests, the duplicate-task check and --resume's input check are built from
those digests, after the shards and before the commit. Who
writes the files is the assembly (`--assembly`): the workers, into the output's staging
location, when every node shares it (one machine, a shared filesystem, an object store); else
the driver, from the tensors the workers return through Ray's object store, one shard at a time
so its memory stays bounded by a shard. Either way the driver reads every file back and checks
its size and sha256 before the commit. The output appears only when complete
(`io.output.open_staged_output`), with an index, the base's `config.json` and a
`merge_report.json` that says what was done, with what, how fast, and which numerical
fallbacks were needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.engine.config import MergeConfig
from pipeline.engine.plan import (
    MergeUnit,
    OutputMode,
    PlannedFile,
    Shard,
    build_units,
    file_names,
    pack_shards,
    plan_files,
)
from pipeline.engine.probe import HiddenPath, check_nodes
from pipeline.engine.records import (
    DoneMarker,
    DtypesRecord,
    EngineRecord,
    FileRecord,
    InputCheckpoint,
    InputDigests,
    InputFile,
    InputsRecord,
    MergeReport,
    ModelSize,
    NumericsRecord,
    OutputFile,
    ShardManifest,
    ShardRecord,
    ShardWork,
    WrittenFile,
)
from pipeline.engine.worker import (
    Fault,
    MergeSettings,
    ShardJob,
    ShardResult,
    hash_inputs,
    mark_done,
    planned_tensors,
    run_shard,
    shard_statistics,
)
from pipeline.errors import InputError, OutputError, PipelineError, UnverifiedOutputError
from pipeline.io import StagedOutput, check_compatible, open_checkpoint, open_staged_output
from pipeline.io.output import (
    REPORT_NAME,
    check_free_space,
    done_marker,
    prepare_output,
)
from pipeline.io.reader import Checkpoint, FileHeader
from pipeline.io.safetensors_io import DTYPE_NAMES, DTYPES, dtype_size, write_tensor_bytes
from pipeline.io.scan import describe_file, file_digest
from pipeline.io.storage import canonical, exists, join, read_bytes, remove, size_of
from pipeline.methods import MethodSpec, get_method
from pipeline.runtime.executors import make_executor

COMPUTE_DTYPES = {"float32": "F32", "float64": "F64"}
# Bumped whenever the same options give different bytes (2: HF projections merged in the
# open_clip orientation), so --resume never reuses files of an older layout.
RUN_FORMAT = 2
# Shards per worker: more, smaller shards balance better and give the progress bar something
# to count; fewer re-open the checkpoints less often.
SHARDS_PER_WORKER = 4
INDEX_NAMES = {"model": "model.safetensors.index.json",
               "task_vector": "task_vector.safetensors.index.json",
               "compressed": "tsv_c.safetensors.index.json"}


# Below this many estimated single-thread seconds of work, `--engine auto` merges in-process:
# starting and stopping the embedded Ray cluster costs more than its second worker saves
# (measured in benchmarks/merge_bench.py; see the README).
AUTO_RAY_ABOVE_S = 30.0


def run_merge(config: MergeConfig, executor=None, fault: Fault | None = None,
              hidden: HiddenPath | None = None) -> MergeReport:
    """Merge as `config` says and return the merge report (also written to the output).

    Every check that needs no tensor bytes (options, output location, headers, free space,
    the cluster, what each node can see) runs before the first tensor byte is read:
    `_prepare` reads none. `fault` and `hidden` inject failures for tests.
    """
    run = _prepare(config, executor, hidden)
    hashing = config.scan_inputs
    # A bad input (NaN/Inf, a duplicate task) is found while or after merging: it raises
    # InputError inside the staged output, which removes the staging; nothing is committed.
    with open_staged_output(config.out, overwrite=config.overwrite,
                            run_key=_run_key(config, run.settings, run.headers, hashing),
                            resume=config.resume) as out:
        reused = _verified_files(out.path, run.files) if out.resumed else {}
        if reused and hashing:
            with run.clock("hash_resumed_inputs"):
                reused = _inputs_unchanged(run, out.path, reused)
        plan = ShardPlan(run.files, [f for f in run.files if f.name not in reused], run.base,
                         run.tuned, run.settings, run.method,
                         out.path if run.assembly == "workers" else None,
                         run.executor.workers, hashing)
        statistics = _model_statistics(run.executor, plan, run.clock)
        with run.clock("merge"):  # each shard's files are read back as soon as it is done
            shards, manifests = _run_shards(run.executor, plan, statistics, fault, out)
        inputs = None
        if hashing:
            with run.clock("input_digests"):
                inputs = _describe_inputs(run, _input_digests(manifests, reused.values()))
        fresh = [f for m in manifests for f in m.files]
        written = _write_index(out, run.settings.mode, run.files, fresh + list(reused.values()))
        metadata_files = _write_metadata(out, run, config)
        run.clock.stop()
        report = _report(run, inputs, statistics, written, metadata_files, shards, manifests,
                         sorted(reused))
        out.write_text(REPORT_NAME, report.to_json())
        out.commit()
    return report


@dataclass
class _Prepared:
    """A merge ready to run: validated, planned, its executor started; no tensor read yet."""

    config: MergeConfig
    clock: Clock
    method: MethodSpec
    settings: MergeSettings
    base: Checkpoint
    tuned: list[Checkpoint]
    specs: dict[str, Any]
    input_dtypes: dict[str, list[str]]
    headers: dict[str, list[FileHeader]]  # checkpoint location -> its files' headers
    files: list[PlannedFile]
    executor: Any
    engine_choice: str
    assembly: str


def _prepare(config: MergeConfig, executor, hidden: HiddenPath | None = None) -> _Prepared:
    clock = Clock()
    method = get_method(config.method)
    params = method.resolve_params(config.params)
    mode: OutputMode = "compressed" if method.kind == "compress" else config.output  # type: ignore
    alpha = method.alpha_for(len(config.finetuned), config.alpha) if mode == "model" else 1.0
    sources = [config.base, *config.finetuned]
    _check_distinct_locations(sources)
    final = prepare_output(config.out, config.overwrite, sources)
    with clock("validate_and_plan"):
        base, tuned, specs, input_dtypes, headers = _open_inputs(config)
        files = plan_files(specs, method, len(tuned), mode=mode,
                           compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                           output_dtype=_dtype_name(config.output_dtype),
                           fuse_qkv=config.fuse_qkv, exclude=config.exclude,
                           max_file_bytes=config.max_shard_bytes)
    check_free_space(config.out, sum(f.nbytes for f in files))
    with clock("executor_start"):
        executor, engine_choice = _executor_for(config, files, executor)
    assembly = "workers"  # in-process, the driver is the worker
    if executor.info()["kind"] == "ray":
        with clock("probe_nodes"):
            assembly = check_nodes(executor, final, [f for c in [base, *tuned] for f in c.files],
                                   executor.device, config.assembly, hidden)
    settings = MergeSettings(method=method.name, params=params, alpha=alpha, mode=mode,
                             exclude=tuple(config.exclude),
                             compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
                             device=executor.device, threads=config.threads)
    return _Prepared(config, clock, method, settings, base, tuned, specs, input_dtypes, headers,
                     files, executor, engine_choice, assembly)


def _report(run: _Prepared, inputs: InputsRecord | None, statistics: dict[str, Any],
            written: list[OutputFile], metadata_files: list[FileRecord], shards: list[Shard],
            manifests: list[ShardManifest], reused: list[str]) -> MergeReport:
    config, settings = run.config, run.settings
    return MergeReport(
        run_id=uuid.uuid4().hex, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        method=run.method.name, params=settings.params,
        alpha=settings.alpha if settings.mode == "model" else None,
        alpha_grid=list(run.method.alpha_grid), output=settings.mode,
        num_tasks=len(run.tuned), options=_options(config), statistics=statistics,
        inputs=inputs.model_dump() if inputs else _locations(config), outputs=written,
        metadata_files=metadata_files,
        model=ModelSize(tensors=len(run.specs),
                        parameters=sum(math.prod(s.shape) for s in run.specs.values())),
        versions=library_versions(),
        timings_s={k: round(v, 4) for k, v in run.clock.seconds.items()},
        engine=_engine_record(run, shards, manifests),
        numerics=_numerics(manifests), resumed_files=reused,
        dtypes=DtypesRecord(inputs=run.input_dtypes, compute=settings.compute_dtype,
                            output=sorted({d for f in run.files for _, d, _ in f.layout})))


def _options(config: MergeConfig) -> dict[str, Any]:
    return {"exclude": list(config.exclude), "compute_dtype": config.compute_dtype,
            "threads": config.threads, "fuse_qkv": config.fuse_qkv,
            "max_shard_size": config.max_shard_size}


def _locations(config: MergeConfig) -> dict[str, Any]:
    """The report's inputs when they were not hashed: where they were, no checksums."""
    return {"base": {"location": config.base},
            "finetuned": [{"location": p} for p in config.finetuned]}


def _numerics(manifests: list[ShardManifest]) -> NumericsRecord:
    return NumericsRecord(fallbacks=[e for m in manifests for e in m.numerics],
                          svd_seconds=round(sum(m.seconds.svd for m in manifests), 4),
                          svd_calls=sum(m.svd_calls for m in manifests))


def _engine_record(run: _Prepared, shards: list[Shard],
                   manifests: list[ShardManifest]) -> EngineRecord:
    work = set(ShardWork.model_fields)
    records = [ShardRecord(index=s.index, files=[f.name for f in s.files],
                           **m.model_dump(include=work))
               for s, m in zip(shards, manifests)]
    # Workers are reused across shards: the largest lifetime peak bounds each.
    peak = max((m.peak_rss_bytes for m in manifests), default=None)
    return EngineRecord(**run.executor.info(), host=platform.node(), chosen=run.engine_choice,
                        shards=records, peak_worker_rss_bytes=peak, assembly=run.assembly,
                        object_store_bytes=sum(m.returned_bytes for m in manifests),
                        peak_driver_rss_bytes=_peak_rss())


class Clock:
    """Named wall-clock spans of one run, for the report's `timings_s`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def stop(self) -> None:
        self.seconds["total"] = time.perf_counter() - self._start


@dataclass(frozen=True)
class ShardPlan:
    """What the executor runs: the planned files, those still to write, and where."""

    files: list[PlannedFile]
    todo: list[PlannedFile]
    base: Checkpoint
    tuned: list[Checkpoint]
    settings: MergeSettings
    method: MethodSpec
    out_dir: str | None  # None: the workers return their tensors and the driver writes
    workers: int
    hash_inputs: bool = True

    def jobs(self, files: list[PlannedFile], statistics: dict[str, Any] | None = None,
             fault: Fault | None = None) -> tuple[list[Shard], list[ShardJob]]:
        shards = pack_shards(files, self.workers * SHARDS_PER_WORKER) if files else []
        return shards, [ShardJob(shard, self.base.location,
                                 tuple(c.location for c in self.tuned), self.settings,
                                 self.method, self.out_dir, statistics or {}, fault,
                                 self.hash_inputs)
                        for shard in shards]


def _open_inputs(config: MergeConfig
                 ) -> tuple[Checkpoint, list[Checkpoint], dict[str, Any], dict[str, list[str]],
                            dict[str, list[FileHeader]]]:
    """Headers only: the checkpoints (closed again; their locations stay known), the base's
    specs, each input's floating dtypes for the report and its files' headers (the run key,
    the input digests), read while the headers are open."""
    base = open_checkpoint(config.base)
    tuned = [open_checkpoint(path) for path in config.finetuned]
    try:
        specs = check_compatible(base, tuned)
        input_dtypes = {c.location: sorted({s.dtype for s in c.specs().values() if s.is_float})
                        for c in [base, *tuned]}
        headers = {c.location: c.file_headers() for c in [base, *tuned]}
    finally:
        for ckpt in [base, *tuned]:
            ckpt.close()
    return base, tuned, specs, input_dtypes, headers


def _executor_for(config: MergeConfig, files: list[PlannedFile], given) -> tuple[Any, str]:
    """The executor, and why it was chosen (recorded in the report)."""
    if given is not None:
        return given, "given by the caller"
    engine, why = config.engine, f"--engine {config.engine}"
    if engine == "auto":
        work = sum(f.cost for f in files)
        if config.address:
            engine, why = "ray", f"auto: joining the Ray cluster at {config.address}"
        elif work < AUTO_RAY_ABOVE_S:
            engine, why = "local", (f"auto: small merge (about {work:.0f} s of work, under "
                                    f"{AUTO_RAY_ABOVE_S:.0f} s), in-process beats starting Ray")
        else:
            engine, why = "ray", (f"auto: large merge (about {work:.0f} s of work), split "
                                  f"across an embedded Ray cluster")
    executor = make_executor(engine, config.address, config.workers, config.threads,
                             config.device, config.gpus_per_task)
    return executor, why


def _model_statistics(executor, plan: ShardPlan, clock: Clock) -> dict[str, Any]:
    """Run the method's model-wide statistics hook, if it has one, over every file (reused or
    not): as many passes as it asks for, each over every shard."""
    hook = plan.method.statistics
    if hook is None:
        return {}
    with clock("model_statistics"):
        _, jobs = plan.jobs(plan.files)
        num_params = sum(u.numel for f in plan.files for u in f.units if u.is_float)
        state = hook.start(len(plan.tuned), num_params, DTYPES[plan.settings.compute_dtype],
                           plan.settings.params)
        while not state.done:
            request = state.request()
            state.combine(executor.map(shard_statistics, [(job, request) for job in jobs],
                                       desc=state.label))
        return state.result()


def _run_shards(executor, plan: ShardPlan, statistics: dict[str, Any], fault: Fault | None,
                out: StagedOutput) -> tuple[list[Shard], list[ShardManifest]]:
    shards, jobs = plan.jobs(plan.todo, statistics, fault)
    manifests: list[ShardManifest | None] = [None] * len(jobs)
    try:
        for i, result in executor.imap(run_shard, [(job,) for job in jobs],
                                       desc=f"merge {plan.settings.method}"):
            manifest = manifests[i] = _assemble(out, shards[i], result)
            del result  # a returned shard's tensors: freed before the next one arrives
            # While the other shards compute: the driver is idle, the files are fresh in cache.
            _read_back(out, manifest)
    except UnverifiedOutputError:
        raise
    except OutputError as exc:  # a failed write: say what the whole output needs
        raise OutputError(f"{exc}; the whole output needs "
                          f"{sum(f.nbytes for f in plan.files)} bytes") from exc
    return shards, [m for m in manifests if m is not None]


def _assemble(out: StagedOutput, shard: Shard, result: ShardResult) -> ShardManifest:
    """A shard's manifest, after the driver wrote its files from the tensors the worker
    returned (`--assembly driver`); as is when the worker wrote them itself."""
    if not result.tensors:
        return result.manifest
    written = [mark_done(out.path, planned,
                         write_tensor_bytes(out.file(planned.name), planned.layout,
                                            result.tensors[planned.name], {"format": "pt"}),
                         result.manifest.input_digests.get(planned.name, {}))
               for planned in shard.files]
    return result.manifest.model_copy(update={"files": written})


def _write_metadata(out: StagedOutput, run: _Prepared, config: MergeConfig
                    ) -> list[FileRecord]:
    """The small files beside the tensors, each read back and hashed for the report."""
    names = []
    if run.settings.mode == "compressed":
        units = build_units(run.specs, config.fuse_qkv)
        out.write_json("tsv_c.json", _artefact_meta(units, run.method, run.settings, config))
        names.append("tsv_c.json")
    if run.settings.mode == "model" and run.base.config_location:
        out.copy_in(run.base.config_location, "config.json")
        names.append("config.json")
    names += [n for n in INDEX_NAMES.values() if exists(out.file(n))]
    return [FileRecord(**describe_file(out.file(name))) for name in sorted(names)]


def _dtype_name(dtype: str | None) -> str | None:
    return None if dtype is None else DTYPE_NAMES[getattr(torch, dtype)]


def _check_distinct_locations(locations: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for path in locations:
        where = canonical(path)
        if where in seen:
            raise InputError(f"{path}: given twice (as {seen[where]!r} too); each task needs its "
                             f"own fine-tuned checkpoint")
        seen[where] = path


def _run_key(config: MergeConfig, settings: MergeSettings,
             headers: dict[str, list[FileHeader]], hashing: bool) -> str:
    """Digest of everything that determines the output bytes: names the staging directory, so
    `--resume` finds the work of an interrupted run of the same merge, and only of that. It
    keys on each input file's place, size and header, read without any tensor byte; a change
    inside the data is caught by `_inputs_unchanged`, which rehashes a reused file's inputs."""
    sources = [[[canonical(h.location), h.size, hashlib.sha256(h.header).hexdigest()]
                for h in headers[c]] for c in [config.base, *config.finetuned]]
    identity = {"format": RUN_FORMAT, "inputs": sources, "hash_inputs": hashing,
                "fuse_qkv": config.fuse_qkv, "output_dtype": config.output_dtype,
                "max_shard_size": config.max_shard_bytes,
                "settings": dataclasses.asdict(settings)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _verified_files(staging: str, files: list[PlannedFile]) -> dict[str, DoneMarker]:
    """Finished files of an interrupted run whose done-marker matches the plan and whose bytes
    still hash to the recorded sha256; anything else is deleted and recomputed."""
    verified = {}
    for planned in files:
        path, marker = join(staging, planned.name), done_marker(staging, planned.name)
        try:
            manifest = DoneMarker.model_validate_json(read_bytes(marker))
            if (manifest.tensors == planned_tensors(planned)
                    and describe_file(path)["sha256"] == manifest.sha256):
                verified[planned.name] = manifest
                continue
        except (OSError, ValueError, PipelineError):  # pydantic's ValidationError included
            pass
        _discard(staging, planned.name)
    return verified


def _discard(staging: str, name: str) -> None:
    for stale in (join(staging, name), done_marker(staging, name)):
        remove(stale)


def _inputs_unchanged(run: _Prepared, staging: str, reused: dict[str, DoneMarker]
                      ) -> dict[str, DoneMarker]:
    """The reused files whose input tensors still hash as their done-markers say. No shard
    reads a reused file's inputs, so this is their one read in this run (and the report's
    digests of them); a file whose inputs changed (same sizes and headers, other bytes) is
    deleted and recomputed."""
    by_name = {f.name: f for f in run.files}
    locations = [run.base.location, *(c.location for c in run.tuned)]
    kept = {}
    for name, marker in reused.items():
        want = by_name[name].input_keys
        if sorted(marker.inputs) == sorted(locations) and all(
                sorted(marker.inputs[loc]) == want for loc in locations):
            kept[name] = marker
        else:  # written by another plan or without hashing: its inputs are unknown
            _discard(staging, name)
    names = sorted(kept)
    found = run.executor.map(hash_inputs, [({loc: by_name[n].input_keys for loc in locations},)
                                           for n in names], desc="hash reused inputs")
    for name, digests in zip(names, found):
        if digests != kept[name].inputs:
            _discard(staging, name)
            del kept[name]
    return kept


def _input_digests(manifests: list[ShardManifest], reused: Iterable[DoneMarker]
                   ) -> InputDigests:
    """Every input tensor's digest, from the shards that read it and the reused files' checks:
    checkpoint location -> {key: sha256}."""
    merged: InputDigests = {}
    sources = [d for m in manifests for d in m.input_digests.values()]
    for digests in sources + [m.inputs for m in reused]:
        for location, keys in digests.items():
            merged.setdefault(location, {}).update(keys)
    return merged


def _describe_inputs(run: _Prepared, digests: InputDigests) -> InputsRecord:
    """The report's inputs, each file with its `tensor_sha256` (`io.scan.file_digest`), and
    the duplicate-task check on them. Tensors no shard read (a key a file holds but its
    index does not list) are hashed here."""
    described = []
    for ckpt in [run.base, *run.tuned]:
        known = digests.get(ckpt.location, {})
        files = []
        for header in run.headers[ckpt.location]:
            missing = [k for k in header.keys if k not in known]
            if missing:  # the one file alone: it knows all its keys
                known = {**known, **hash_inputs({header.location: missing})[header.location]}
            files.append(InputFile(path=header.location, size=header.size,
                                   tensor_sha256=file_digest(header.header,
                                                             [known[k] for k in header.keys])))
        described.append(InputCheckpoint(location=ckpt.location,
                                         size=sum(f.size for f in files), files=files))
    _check_distinct(described)
    return InputsRecord(base=described[0], finetuned=described[1:])


def _check_distinct(described: list[InputCheckpoint]) -> None:
    """Two tasks with the same bytes double one task's weight silently; refuse. A task equal to
    the base has a zero task vector: legal, but almost always a wrong path, so warn. Files with
    different headers never match; equal headers are told apart by their tensors' digests."""
    fingerprints: dict[tuple, str] = {}
    for i, ckpt in enumerate(described):
        fingerprint = tuple(f.tensor_sha256 for f in ckpt.files)
        if fingerprint in fingerprints:
            first = fingerprints[fingerprint]
            if i > 0 and first == described[0].location:
                warnings.warn(f"{ckpt.location}: identical to the base {first}; its task "
                              f"vector is zero", stacklevel=3)
                continue
            raise InputError(f"{ckpt.location}: same content (sha256) as {first}; each task "
                             f"needs its own fine-tuned checkpoint")
        fingerprints[fingerprint] = ckpt.location


def _read_back(out: StagedOutput, manifest: ShardManifest) -> None:
    """Nothing is committed on a worker's word alone: each file a shard wrote is read back here
    and must have the size and sha256 its writer reported (reused files of a resumed run were
    hashed by `_verified_files`). A file that is not here at all was written where the driver
    cannot see it (a node's own disk)."""
    for entry in manifest.files:
        location = out.file(entry.name)
        if size_of(location) is None:
            raise UnverifiedOutputError(
                f"{location}: written by shard {manifest.shard} on node {manifest.node} "
                f"({manifest.node_id[:12] or 'in-process'}) but not found by the driver "
                f"(no filesystem shared with that node? --assembly driver needs none); "
                f"not committed")
        found = describe_file(location)
        if (found["size"], found["sha256"]) != (entry.size, entry.sha256):
            raise UnverifiedOutputError(
                f"{location}: holds {found['size']} bytes with sha256 {found['sha256'][:12]}, "
                f"its writer wrote {entry.size} bytes with sha256 {entry.sha256[:12]}; "
                f"not committed")


def _write_index(out: StagedOutput, mode: OutputMode, files: list[PlannedFile],
                 written: list[WrittenFile]) -> list[OutputFile]:
    written = sorted(written, key=lambda f: f.name)
    expected = sorted(f.name for f in files)
    if [f.name for f in written] != expected:
        raise RuntimeError(f"shards wrote {[f.name for f in written]}, planned {expected}")
    if len(files) > 1 or files[0].name != file_names(1, mode)[0]:
        weight_map = {key: f.name for f in written for key in f.tensors}
        total = sum(math.prod(t.shape) * dtype_size(t.dtype)
                    for f in written for t in f.tensors.values())
        out.write_json(INDEX_NAMES[mode], {"metadata": {"total_size": total},
                                           "weight_map": dict(sorted(weight_map.items()))})
    return [OutputFile(name=f.name, size=f.size, sha256=f.sha256, tensors=len(f.tensors))
            for f in written]


def _artefact_meta(units: list[MergeUnit], method: MethodSpec, settings: MergeSettings,
                   config: MergeConfig) -> dict[str, Any]:
    """How to rebuild each stored key from a TSV-C artefact (see `engine.expand`). The
    factors are of the unit in open_clip's orientation: `transposed` says to turn it back."""
    described = {}
    for u in units:
        kind = ("matrix" if method.uses_matrix_rule(u.name, u.shape, settings.exclude) else
                "whole" if u.is_float else "copy")
        described[u.name] = {"sources": list(u.sources), "rows": list(u.rows), "kind": kind,
                             "transposed": u.transposed}
    return {"method": method.name, "num_tasks": len(config.finetuned),
            "finetuned": list(config.finetuned),
            "base": config.base, "compute_dtype": settings.compute_dtype,
            "units": dict(sorted(described.items()))}


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def library_versions() -> dict[str, str]:
    import pyarrow
    import safetensors
    import torch
    versions = {"pipeline": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "safetensors": safetensors.__version__,
                "pyarrow": pyarrow.__version__, "numpy": np.__version__}
    if "ray" in sys.modules:
        versions["ray"] = sys.modules["ray"].__version__
    return versions
