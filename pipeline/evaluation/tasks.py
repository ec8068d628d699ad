"""From a manifest to evaluation tasks: each task's head, and per split the rows to read.

This runs on the driver and reads only metadata (parquet footers, directory listings, a head
file, the text tower for zero-shot heads): the images themselves are read by the evaluators,
each its own rows, so the driver's memory does not grow with the datasets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.evaluation.datasets import (
    DatasetInfo,
    SplitSource,
    open_dataset,
    papers_validation_rows,
)
from pipeline.evaluation.heads import Head, load_head_file
from pipeline.evaluation.manifest import LoadedManifest, Manifest, TaskSpec
from pipeline.evaluation.zero_shot import zero_shot_head

SPLITS = ("val", "test")  # what evaluation asks for: validation (alpha search) and test


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split to evaluate: all of `source`, or the listed ones (ascending;
    a validation subset drawn from train)."""

    source: SplitSource
    rows: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.source.num_rows if self.rows is None else len(self.rows)

    def rows_between(self, start: int, stop: int) -> Sequence[int]:
        """Rows of the source at positions [start, stop) of this split."""
        if self.rows is None:
            return range(start, min(stop, self.source.num_rows))
        return [int(r) for r in self.rows[start:stop]]


@dataclass(frozen=True)
class EvalTask:
    """A task as the evaluators need it; small and picklable (sent once to each actor)."""

    name: str
    head: Head
    head_origin: str
    splits: Mapping[str, SplitRows]
    data_location: str
    finetuned: str | None = None
    finetuned_accuracy: Mapping[str, float] | None = None


@contextmanager
def task_errors(task: str) -> Iterator[None]:
    """Every user error about a task says which task: manifests list dozens."""
    try:
        yield
    except InputError as exc:
        if str(exc).startswith("task "):
            raise
        raise type(exc)(f"task {task!r}: {exc}") from None


def resolve_tasks(loaded: LoadedManifest, count: int | None = None,
                  splits: Sequence[str] = SPLITS) -> list[EvalTask]:
    return [resolve_task(loaded.manifest, spec, splits) for spec in loaded.select(count)]


def resolve_task(manifest: Manifest, spec: TaskSpec, splits: Sequence[str] = SPLITS
                 ) -> EvalTask:
    with task_errors(spec.name):
        data = spec.data_spec
        info = open_dataset(data.location, data.format)
        rows = {split: _split_rows(spec, info, split) for split in splits}
        head, origin = _head(manifest, spec, info)
        if info.classnames is not None and len(info.classnames) != head.num_classes:
            raise InputError(f"{origin}: the head has {head.num_classes} classes, the data "
                             f"at {data.location} has {len(info.classnames)}")
        accuracy = spec.finetuned_accuracy
        return EvalTask(
            name=spec.name, head=head, head_origin=origin, splits=rows,
            data_location=data.location, finetuned=spec.finetuned,
            finetuned_accuracy=None if accuracy is None else
            {"val": accuracy.validation, "test": accuracy.test})


def _split_rows(spec: TaskSpec, info: DatasetInfo, split: str) -> SplitRows:
    def source(name: str) -> SplitSource:
        if name not in info.splits:
            raise InputError(f"{info.location}: no split {name!r} (it has: "
                             f"{', '.join(sorted(info.splits)) or 'none'})")
        return info.splits[name]

    if split == "test":
        return SplitRows(source(spec.splits.test))
    held_out = spec.splits.held_out()
    if held_out is None:
        return SplitRows(source(str(spec.splits.validation)))
    train = source(held_out.from_split)
    rows = papers_validation_rows(train.num_rows, held_out.fraction, held_out.cap,
                                  held_out.seed)
    if not len(rows):
        raise InputError(f"{info.location}: split {held_out.from_split!r} has "
                         f"{train.num_rows} rows, too few to hold out a validation set")
    return SplitRows(train, rows)


def _head(manifest: Manifest, spec: TaskSpec, info: DatasetInfo) -> tuple[Head, str]:
    head = spec.head_spec
    if head.file is not None:
        return load_head_file(head.file), head.file
    zero_shot = head.zero_shot
    assert zero_shot is not None  # head_spec guarantees exactly one
    clip = zero_shot.clip or manifest.clip or manifest.base
    if clip is None:
        raise InputError("a zero-shot head needs a full CLIP model directory: set `clip` in "
                         "the manifest or the head's `zero_shot`")
    templates = zero_shot.templates or manifest.templates
    if not templates:
        raise InputError("a zero-shot head needs `templates` (in the head's `zero_shot` or "
                         "at the top of the manifest), e.g. ['a photo of a {}.']")
    classnames = zero_shot.classnames or info.classnames
    if not classnames:
        raise InputError(f"{info.location}: the data names no classes; list `classnames` in "
                         f"the head's `zero_shot`")
    return zero_shot_head(clip, list(classnames), list(templates)), clip
