"""Planning: merge units, layer groups, output files and cost-balanced shards. Pure.

The output layout must not depend on the worker count (same bits at any scale), so it is fixed
first: one file per layer group (split further only past `max_file_bytes`). Shards, the units
of Ray work, are then whole files packed by estimated cost: longest-processing-time-first onto
the least loaded shard, which keeps the slowest shard within 4/3 of the optimum.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.io.layout import group_of, natural_key, qkv_fusions, transposed_vs_open_clip
from pipeline.io.reader import TensorSpec
from pipeline.io.safetensors_io import dtype_size
from pipeline.methods import MethodSpec

OutputMode = Literal["model", "task_vector", "compressed"]

# Rough single-thread rates of this class of CPU, for balancing only (not promises).
SVD_FLOPS_PER_S = 4e9
BYTES_PER_S = 1e9


@dataclass(frozen=True)
class MergeUnit:
    """What the math sees as one key: one stored tensor, or several concatenated on dim 0,
    in open_clip's orientation: a `transposed` unit (HF's `visual_projection.weight`) is
    merged as the transpose of what is stored, because Iso-CTS is not transpose-equivariant
    and the papers define it on open_clip's `visual.proj`. Results are written back as stored.
    """

    name: str
    sources: tuple[str, ...]
    rows: tuple[int, ...]  # dim-0 size of each source as stored, to split the result back
    shape: tuple[int, ...]  # what the math sees (transposed back from the stored layout)
    dtype: str
    transposed: bool = False

    @property
    def is_float(self) -> bool:
        return TensorSpec(self.dtype, self.shape).is_float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def source_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each source's stored shape, in `sources` order."""
        if not self.shape:
            return ((),)
        stored = self.shape[::-1] if self.transposed else self.shape
        return tuple((rows,) + stored[1:] for rows in self.rows)


@dataclass(frozen=True)
class PlannedFile:
    """One output file: the units merged into it, and `hashed_only`: units that write nothing
    (integer buffers of a layer group with no floating tensor, in a task vector or an
    artefact) whose input tensors this file's shard still reads, so that every stored tensor
    of every input is hashed exactly once, by a shard the plan names whatever the worker count.
    """

    name: str
    units: tuple[MergeUnit, ...]
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]  # (key, dtype, shape), write order
    cost: float
    hashed_only: tuple[MergeUnit, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * dtype_size(d) for _, d, s in self.layout)

    @property
    def input_keys(self) -> list[str]:
        """The stored keys this file's shard reads from every input checkpoint."""
        return sorted(k for u in self.units + self.hashed_only for k in u.sources)


@dataclass(frozen=True)
class Shard:
    index: int
    files: tuple[PlannedFile, ...]

    @property
    def cost(self) -> float:
        return sum(f.cost for f in self.files)


def build_units(specs: Mapping[str, TensorSpec], fuse_qkv: bool = False) -> list[MergeUnit]:
    """The merge units of a checkpoint, in model order: q/k/v triples fused when asked, keys
    stored transposed relative to open_clip always turned (free for every method but Iso-CTS,
    where it is what the papers compute)."""
    fused = qkv_fusions({k: s.shape for k, s in specs.items()}) if fuse_qkv else {}
    consumed = {k for triple in fused.values() for k in triple}
    units: list[MergeUnit] = []
    for name, sources in fused.items():
        first = specs[sources[0]]
        if len({specs[k].dtype for k in sources}) != 1:
            units.extend(_single(k, specs[k]) for k in sources)
            continue
        rows = tuple(specs[k].shape[0] for k in sources)
        units.append(MergeUnit(name, sources, rows, (sum(rows),) + first.shape[1:], first.dtype))
    units.extend(_single(k, s) for k, s in specs.items() if k not in consumed)
    return sorted(units, key=lambda u: natural_key(u.name))


def _single(key: str, spec: TensorSpec) -> MergeUnit:
    rows = (spec.shape[0] if spec.shape else 0,)
    if transposed_vs_open_clip(key, spec.shape):
        return MergeUnit(key, (key,), rows, spec.shape[::-1], spec.dtype, transposed=True)
    return MergeUnit(key, (key,), rows, spec.shape, spec.dtype)


def unit_outputs(unit: MergeUnit, method: MethodSpec, mode: OutputMode, compute_dtype: str,
                 num_tasks: int, matrix: bool, output_dtype: str | None = None
                 ) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (key, dtype, shape) entries a unit writes in a given output mode. Floating tensors
    of a model keep the base's dtype and a task vector the compute dtype, unless
    `output_dtype` says otherwise; workers cast to whatever this layout says."""
    if mode == "model":
        dtype = output_dtype if output_dtype and unit.is_float else unit.dtype
        return [(key, dtype, shape) for key, shape in zip(unit.sources, unit.source_shapes)]
    if not unit.is_float:
        return []  # integer buffers are not part of a task vector
    if mode == "task_vector":
        return [(key, output_dtype or compute_dtype, shape)
                for key, shape in zip(unit.sources, unit.source_shapes)]
    if not matrix or method.factors is None:
        return [(f"{unit.name}::tau", compute_dtype, (num_tasks,) + unit.shape)]
    m, n = unit.shape
    return [(f"{unit.name}::{part}", compute_dtype, shape)
            for part, shape in method.factors(m, n, num_tasks).items()]


def unit_cost(unit: MergeUnit, method: MethodSpec, num_tasks: int, matrix: bool) -> float:
    """Estimated single-thread seconds: the SVDs plus reading T+1 copies."""
    seconds = unit.numel * dtype_size(unit.dtype) * (num_tasks + 1) / BYTES_PER_S
    if matrix and unit.is_float:
        m, n = unit.shape
        seconds += method.svds_per_key(num_tasks) * m * n * min(m, n) / SVD_FLOPS_PER_S
    return seconds


def plan_files(specs: Mapping[str, TensorSpec], method: MethodSpec, num_tasks: int, *,
               mode: OutputMode, compute_dtype: str = "F32", output_dtype: str | None = None,
               fuse_qkv: bool = False, exclude: Sequence[str] = (),
               max_file_bytes: int = 4 << 30) -> list[PlannedFile]:
    """The output files, in model order, each holding whole layer groups' units."""
    by_group: dict[str, list[MergeUnit]] = defaultdict(list)
    for unit in build_units(specs, fuse_qkv):
        by_group[group_of(unit.sources[0])].append(unit)
    chunks: list[list[tuple[MergeUnit, list, float]]] = []
    for group in sorted(by_group, key=natural_key):
        current: list[tuple[MergeUnit, list, float]] = []
        size = 0
        for unit in by_group[group]:
            matrix = method.uses_matrix_rule(unit.name, unit.shape, exclude)
            outputs = unit_outputs(unit, method, mode, compute_dtype, num_tasks, matrix,
                                   output_dtype)
            nbytes = sum(math.prod(s) * dtype_size(d) for _, d, s in outputs)
            if current and size + nbytes > max_file_bytes:
                chunks.append(current)
                current, size = [], 0
            current.append((unit, outputs, unit_cost(unit, method, num_tasks, matrix)))
            size += nbytes
        if current:
            chunks.append(current)
    kept, silent = _attach_silent_chunks(chunks)
    names = file_names(len(kept), mode)
    return [PlannedFile(name, tuple(u for u, _, _ in chunk),
                        tuple(sorted(e for _, outputs, _ in chunk for e in outputs)),
                        sum(cost for _, _, cost in chunk), tuple(extra))
            for name, chunk, extra in zip(names, kept, silent)]


def _attach_silent_chunks(chunks: list[list[tuple[MergeUnit, list, float]]]
                          ) -> tuple[list[list[tuple[MergeUnit, list, float]]],
                                     list[list[MergeUnit]]]:
    """Chunks that write nothing make no file; their units are read (to be hashed) by the
    file before them in model order, or the first file when none comes before."""
    kept: list[list[tuple[MergeUnit, list, float]]] = []
    silent: list[list[MergeUnit]] = []
    waiting: list[MergeUnit] = []
    for chunk in chunks:
        if any(outputs for _, outputs, _ in chunk):
            kept.append(chunk)
            silent.append(waiting)
            waiting = []
        elif silent:
            silent[-1].extend(u for u, _, _ in chunk)
        else:
            waiting.extend(u for u, _, _ in chunk)
    return kept, silent


def file_names(count: int, mode: OutputMode) -> list[str]:
    stem = {"model": "model", "task_vector": "task_vector", "compressed": "tsv_c"}[mode]
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def pack_shards(files: Sequence[PlannedFile], num_shards: int) -> list[Shard]:
    """Longest-processing-time-first packing of files into at most `num_shards` shards.
    Ties break by position, so the plan is a pure function of its inputs."""
    num_shards = max(1, min(num_shards, len(files)))
    bins: list[list[PlannedFile]] = [[] for _ in range(num_shards)]
    loads = [0.0] * num_shards
    for f in sorted(files, key=lambda f: -f.cost):
        target = min(range(num_shards), key=lambda i: (loads[i], i))
        bins[target].append(f)
        loads[target] += f.cost
    shards = [Shard(0, tuple(sorted(b, key=lambda f: f.name))) for b in bins if b]
    shards.sort(key=lambda s: -s.cost)  # start the longest first
    return [Shard(i, s.files) for i, s in enumerate(shards)]

