"""The task manifest: which tasks to evaluate on, where their data and heads are, as users
already hold them (no conversion step).

```yaml
base: /models/clip-vit-base-patch32      # optional (or --base): theta_0
clip: /models/clip-vit-base-patch32      # optional: full CLIPModel directory for zero-shot heads
templates: ["a photo of a {}."]          # optional: default zero-shot templates
preprocess: auto                          # auto | clip | path/to/preprocessor_config.json
tasks:
  - name: dtd
    data: /data/tanganke/dtd              # HF parquet, save_to_disk or image folder; or a URI
    splits: {test: test, validation: papers}
    head: heads/head_DTDVal.pt            # safetensors, the papers' pickle, or {zero_shot: ...}
    finetuned: /models/ft/dtd             # optional: fine-tuned checkpoint of this task
    finetuned_accuracy: {validation: 0.79, test: 0.78}   # optional, fractions
```

Relative paths are relative to the manifest's own directory, so a manifest travels with its
data (the built-in suites export themselves this way). The manifest is a typed record: a
misspelt field, a missing head or a split that does not exist is one line naming the task and
the file before any evaluation starts.
"""

from __future__ import annotations

import hashlib
import os
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import InputError
from pipeline.io import storage
from pipeline.io.output import write_file_atomic

# The papers' validation split (REAL-FORMATS.md §2): 10% of train, at most 5,000 images,
# torch.utils.data.random_split with Generator().manual_seed(0). FusionBench: no cap.
PAPERS_FRACTION, PAPERS_CAP, PAPERS_SEED = 0.1, 5000, 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DataSpec(_Strict):
    location: str
    format: Literal["parquet", "arrow", "imagefolder"] | None = None  # None: detect


class HeldOutSpec(_Strict):
    """A validation split drawn from another split as `random_split` draws it."""

    from_split: str = Field("train", alias="from")
    fraction: float = Field(PAPERS_FRACTION, gt=0, lt=1)
    cap: int | None = Field(PAPERS_CAP, ge=1)
    seed: int = PAPERS_SEED


class SplitsSpec(_Strict):
    test: str = "test"
    # "papers" (the default), "fusionbench" (no cap), a held-out draw, or a split's name.
    validation: str | HeldOutSpec = "papers"

    def held_out(self) -> HeldOutSpec | None:
        if isinstance(self.validation, HeldOutSpec):
            return self.validation
        if self.validation == "papers":
            return HeldOutSpec()
        if self.validation == "fusionbench":
            return HeldOutSpec(cap=None)
        return None


class ZeroShotSpec(_Strict):
    templates: list[str] | None = None    # default: the manifest's `templates`
    classnames: list[str] | None = None   # default: the dataset's class names
    clip: str | None = None               # default: the manifest's `clip`


class HeadSpec(_Strict):
    file: str | None = None
    zero_shot: ZeroShotSpec | None = None


class FinetunedAccuracy(_Strict):
    validation: float = Field(gt=0, le=1)
    test: float = Field(gt=0, le=1)


class TaskSpec(_Strict):
    name: str = Field(min_length=1)
    data: str | DataSpec
    splits: SplitsSpec = SplitsSpec()
    head: str | HeadSpec
    finetuned: str | None = None
    finetuned_accuracy: FinetunedAccuracy | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if "/" in name or name.strip() != name or name in (".", ".."):
            raise ValueError("a task name must be a plain word (no '/', no surrounding spaces)")
        return name

    @property
    def data_spec(self) -> DataSpec:
        return self.data if isinstance(self.data, DataSpec) else DataSpec(location=self.data)

    @property
    def head_spec(self) -> HeadSpec:
        head = self.head if isinstance(self.head, HeadSpec) else HeadSpec(file=self.head)
        if (head.file is None) == (head.zero_shot is None):
            raise InputError(f"task {self.name!r}: head needs exactly one of `file` or "
                             f"`zero_shot`")
        return head


class Manifest(_Strict):
    version: Literal[1] = 1
    base: str | None = None
    clip: str | None = None
    templates: list[str] | None = None
    preprocess: str = "auto"
    tasks: list[TaskSpec] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"task {task.name!r} is listed twice")
            seen.add(task.name)
        return tasks


class LoadedManifest(BaseModel):
    """A parsed manifest with every path made absolute, and the digest of its bytes (what the
    results history keys runs by, so runs on different data are never compared)."""

    model_config = ConfigDict(frozen=True)
    location: str
    digest: str
    manifest: Manifest

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    def select(self, count: int | None) -> list[TaskSpec]:
        tasks = self.manifest.tasks
        if count is None:
            return list(tasks)
        if not 1 <= count <= len(tasks):
            raise InputError(f"--tasks must be between 1 and {len(tasks)} for "
                             f"{self.location}, got {count}")
        return list(tasks[:count])


def load_manifest(location: str) -> LoadedManifest:
    """Read, validate and resolve a manifest (local path or URI)."""
    try:
        raw = storage.read_bytes(location)
    except FileNotFoundError:
        raise InputError(f"{location}: task manifest does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{location}: a task manifest is a YAML file, not a directory") \
            from None
    try:
        values = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).replace("\n", " ")
        raise InputError(f"{location}: not a valid YAML task manifest ({problem})") from None
    if not isinstance(values, dict):
        raise InputError(f"{location}: a task manifest is a mapping with a `tasks` list")
    try:
        manifest = Manifest(**values)
    except ValidationError as exc:
        raise InputError(f"{location}: {_problem(exc, values)}") from None
    return LoadedManifest(location=location, digest=hashlib.sha256(raw).hexdigest(),
                          manifest=_resolved(manifest, _directory_of(location)))


def _problem(exc: ValidationError, values: dict) -> str:
    """The first validation problem, named by task where it is inside one."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = ".".join(str(p) for p in loc) or "manifest"
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        tasks = values.get("tasks") or []
        task = tasks[loc[1]] if loc[1] < len(tasks) else None
        name = task.get("name") if isinstance(task, dict) else None
        field = ".".join(str(p) for p in loc[2:] if not str(p).startswith(("str", "function")))
        where = f"task {name or '#' + str(loc[1] + 1)!r}: {field or 'entry'}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "is required"
    return f"{where}: {message}"


def _directory_of(location: str) -> str:
    return storage.parent_and_name(storage.canonical(location))[0]


def resolve_path(path: str, directory: str) -> str:
    """`path` as written in a manifest: absolute and URIs as they are; relative to the
    manifest's directory otherwise."""
    if storage.is_uri(path) or os.path.isabs(path):
        return path
    if storage.is_uri(directory):
        return storage.join(directory, path)
    return os.path.normpath(os.path.join(directory, path))


def _resolved(manifest: Manifest, directory: str) -> Manifest:
    def at(path: str | None) -> str | None:
        return None if path is None else resolve_path(path, directory)

    tasks = []
    for task in manifest.tasks:
        data = task.data_spec
        head = task.head_spec
        zero_shot = head.zero_shot
        if zero_shot is not None:
            zero_shot = zero_shot.model_copy(update={"clip": at(zero_shot.clip)})
        tasks.append(task.model_copy(update={
            "data": data.model_copy(update={"location": at(data.location)}),
            "head": HeadSpec(file=at(head.file), zero_shot=zero_shot),
            "finetuned": at(task.finetuned)}))
    preprocess = manifest.preprocess
    if preprocess not in ("auto", "clip"):
        preprocess = resolve_path(preprocess, directory)
    return manifest.model_copy(update={"base": at(manifest.base), "clip": at(manifest.clip),
                                       "preprocess": preprocess, "tasks": tasks})


def write_manifest(location: str, manifest: Manifest) -> None:
    """A manifest as YAML (used to export the built-in suites), written atomically."""
    text = yaml.safe_dump(manifest.model_dump(mode="json", by_alias=True, exclude_none=True,
                                              exclude_defaults=True), sort_keys=False)
    write_file_atomic(location, lambda fh: fh.write(text.encode()))
