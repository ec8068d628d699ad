"""Typed records that cross layers: what a shard worker returns and what a merge reports.

Workers, the driver, `verify`, the CLI, the history and the benchmarks all read these; as
pydantic models they are checked once where they are made and read by attribute everywhere
else, and each has one JSON (de)serialiser. `merge_report.json` carries a schema version:
reports written before versions existed read as version 1, and a report from a newer
pipeline fails with a clear message instead of a KeyError.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import InputError

REPORT_SCHEMA_VERSION = 2


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorLayout(_Record):
    dtype: str
    shape: list[int]


class FileRecord(_Record):
    """A written file: what `verify` checks it against. Read leniently (a tensor file's record
    also counts its tensors), written exactly."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    size: int
    sha256: str


class WrittenFile(FileRecord):
    """A tensor file a shard wrote, with its planned layout (also its resume marker)."""

    tensors: dict[str, TensorLayout]


# checkpoint location -> {stored key: sha256 of that tensor's bytes as stored}
InputDigests = dict[str, dict[str, str]]


class DoneMarker(WrittenFile):
    """A finished file's done-marker in the staging directory: its record and the input
    tensors it was computed from (`inputs`; empty when inputs were not hashed). --resume
    reuses the file only if those tensors still hash the same."""

    inputs: InputDigests = Field(default_factory=dict)


class InputFile(_Record):
    """One input file in the report. `tensor_sha256` is the sha256 of its header followed by
    the sha256 of each tensor in file order: equal files have equal digests, but it is not
    the sha256sum of the file (`io.scan.file_digest`)."""

    path: str
    size: int
    tensor_sha256: str


class InputCheckpoint(_Record):
    location: str
    size: int
    files: list[InputFile]


class InputsRecord(_Record):
    """The report's `inputs` when they were hashed (else only their locations)."""

    base: InputCheckpoint
    finetuned: list[InputCheckpoint]


class OutputFile(FileRecord):
    tensors: int  # how many tensors it holds


class ShardSeconds(_Record):
    total: float
    read: float
    compute: float
    write: float
    svd: float


class ShardWork(_Record):
    """Where a shard ran and what it cost: in the worker's manifest and in the report."""

    units: int
    cost_estimate_s: float
    node: str
    pid: int
    device: str
    bytes_read: int
    seconds: ShardSeconds
    svd_calls: int
    # Lifetime peak of the worker process (Ray reuses workers): an upper bound per shard.
    peak_rss_bytes: int
    node_id: str = ""  # the Ray node it ran on ("" in-process)
    # Merged tensor bytes sent back through Ray's object store (`--assembly driver`), else 0.
    returned_bytes: int = 0
    peak_device_bytes: int | None = None  # the CUDA allocator's peak, on a GPU


class ShardManifest(ShardWork):
    """What a worker returns for its shard: small, never tensors."""

    shard: int
    files: list[WrittenFile]
    numerics: list[str]  # numerical fallbacks, one line each
    # planned file -> the input tensors read for it and their sha256 (empty: not hashed)
    input_digests: dict[str, InputDigests] = Field(default_factory=dict)


class ShardRecord(ShardWork):
    """A shard in the merge report: its work, and the names of the files it wrote."""

    index: int
    files: list[str]


class EngineRecord(BaseModel):
    """Where and how the merge ran. Executor details vary by executor, hence `extra`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str
    workers: int
    device: str
    host: str = ""
    chosen: str = ""
    shards: list[ShardRecord] = Field(default_factory=list)
    peak_worker_rss_bytes: int | None = None


class NumericsRecord(_Record):
    fallbacks: list[str]
    svd_seconds: float
    svd_calls: int


class ModelSize(_Record):
    tensors: int
    parameters: int


class DtypesRecord(_Record):
    inputs: dict[str, list[str]]
    compute: str
    output: list[str]


def _parse(cls: type[BaseModel], text: str | bytes, where: str) -> Any:
    """One reader for every report file: JSON, schema version, then the fields."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: malformed (not a JSON object)")
    version = raw.get("schema_version", 1)  # reports before versions: 1
    if not isinstance(version, int) or version > REPORT_SCHEMA_VERSION:
        raise InputError(f"{where}: schema version {version!r} is newer than this pipeline "
                         f"reads ({REPORT_SCHEMA_VERSION}); upgrade merge-pipeline")
    try:
        return cls.model_validate({**raw, "schema_version": version})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{where}: malformed ({field}: {first['msg']})") from None


class VersionedFile(BaseModel):
    """A record written as a whole JSON file, with the schema version readers check."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class OutputListing(BaseModel):
    """The part of any report of ours (merge or expand) that says which files the output
    holds: all that `verify` relies on. Version 1 reports lack `metadata_files` (None)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int
    output: str
    outputs: list[FileRecord]
    metadata_files: list[FileRecord] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    @property
    def base_location(self) -> str | None:
        base = self.inputs.get("base")
        return base.get("location") if isinstance(base, dict) else None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "merge_report.json") -> "OutputListing":
        return _parse(cls, text, where)


class ExpandReport(VersionedFile):
    """`merge_report.json` of a model rebuilt from a TSV-C artefact by `expand`."""

    kind: str = "expand"
    method: str
    task: int
    num_tasks: int
    output: str = "model"
    outputs: list[FileRecord]
    metadata_files: list[FileRecord]
    inputs: dict[str, Any]
    created: str
    timings_s: dict[str, float]


class MergeReport(VersionedFile):
    """`merge_report.json`: what was merged, how, from what, into which files."""

    run_id: str
    created: str
    method: str
    params: dict[str, Any]
    alpha: float | None
    alpha_grid: list[float]
    output: str
    num_tasks: int
    options: dict[str, Any]
    statistics: dict[str, Any]
    inputs: dict[str, Any]
    outputs: list[OutputFile]
    metadata_files: list[FileRecord] = Field(default_factory=list)
    model: ModelSize
    versions: dict[str, str]
    timings_s: dict[str, float]
    engine: EngineRecord
    numerics: NumericsRecord
    resumed_files: list[str] = Field(default_factory=list)
    dtypes: DtypesRecord | None = None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "merge_report.json") -> "MergeReport":
        return _parse(cls, text, where)
