"""Serving a TSV-C artefact: rebuild task t's model as theta_0 + tau_t^c.

The artefact (written by `merge --method tsv_c`) stores, per matrix and task, the top-k factors
U (m x k), s (k) and Vh (k x n), stacked over tasks, plus the other keys' task vectors whole,
and `tsv_c.json` saying how fused units split back into stored keys and which units were
merged transposed (HF's `visual_projection.weight`, factored in open_clip's orientation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.engine.records import ExpandReport, FileRecord
from pipeline.errors import InputError
from pipeline.io import Checkpoint, StagedOutput, open_checkpoint, open_staged_output
from pipeline.io.output import REPORT_NAME, prepare_output
from pipeline.io.safetensors_io import DTYPES, write_safetensors
from pipeline.io.scan import describe_file
from pipeline.io.storage import join, read_bytes
from pipeline.methods import MethodSpec, get_method

ARTEFACT_META = "tsv_c.json"
FILE_BYTES = 1 << 30


def expand_task(artefact: str, base: str, task: int, out: str, overwrite: bool = False) -> str:
    """Write task `task`'s (0-based) model from the artefact and the base; returns `out`."""
    prepare_output(out, overwrite, [artefact, base])  # before any tensor byte is read
    meta = _read_meta(artefact, task)
    method = get_method(meta.get("method", "tsv_c"))  # artefacts before 2: always TSV-C
    if method.reconstruct is None:
        raise InputError(f"{artefact}: method {method.name!r} stores no per-task factors")
    started = time.perf_counter()
    with open_checkpoint(artefact) as factors, open_checkpoint(base) as theta0, \
            open_staged_output(out, overwrite) as staged:
        weight_map = _write_in_files(staged, _task_tensors(meta, method, factors, theta0, task))
        staged.write_json("model.safetensors.index.json",
                          {"metadata": {"source": artefact, "task": task},
                           "weight_map": dict(sorted(weight_map.items()))})
        if theta0.config_location:
            staged.copy_in(theta0.config_location, "config.json")
        staged.write_text(REPORT_NAME, _expand_report(staged, artefact, base, task, meta,
                                                      time.perf_counter() - started).to_json())
        return staged.commit()


def _read_meta(artefact: str, task: int) -> dict[str, Any]:
    try:
        meta = json.loads(read_bytes(join(artefact, ARTEFACT_META)))
    except InputError:
        raise InputError(f"{artefact}: not a TSV-C artefact (no {ARTEFACT_META})") from None
    except ValueError as exc:
        raise InputError(f"{artefact}: {ARTEFACT_META} is not valid JSON ({exc})") from None
    if not 0 <= task < meta["num_tasks"]:
        raise InputError(f"{artefact}: task {task} out of range (artefact has "
                         f"{meta['num_tasks']} tasks, numbered from 0)")
    return meta


def _task_tensors(meta: dict[str, Any], method: MethodSpec, factors: Checkpoint,
                  theta0: Checkpoint, task: int) -> Iterator[tuple[str, torch.Tensor]]:
    """theta_0 + tau_task^c under every stored key of the base, unit by unit."""
    compute = DTYPES[meta["compute_dtype"]]
    stored: dict[str, list[str]] = {}  # unit -> the names of its stored factors
    for key in factors.keys():
        unit_name, _, factor = key.rpartition("::")
        stored.setdefault(unit_name, []).append(factor)
    for name, unit in meta["units"].items():
        sources = unit["sources"]
        base_parts = [theta0.read(k) for k in sources]
        if unit["kind"] == "copy":
            yield from zip(sources, base_parts)
            continue
        if unit["kind"] == "matrix":
            assert method.reconstruct is not None
            tau = method.reconstruct({factor: factors.read(f"{name}::{factor}")[task]
                                      for factor in stored[name]})
        else:
            tau = factors.read(f"{name}::tau")[task]
        if unit.get("transposed", False):  # absent in older artefacts: not transposed
            tau = tau.T
        theta = torch.cat(base_parts).to(compute) + tau.to(compute)
        pieces = theta.split(unit["rows"]) if len(sources) > 1 else [theta]
        for key, piece, stored_part in zip(sources, pieces, base_parts):
            yield key, piece.reshape(stored_part.shape).to(stored_part.dtype)


def _write_in_files(staged: StagedOutput, tensors: Iterator[tuple[str, torch.Tensor]]
                    ) -> dict[str, str]:
    """Write tensors into numbered files of about FILE_BYTES each; returns the weight map."""
    pending: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        write_safetensors(staged.file(name), pending)
        weight_map.update({k: name for k in pending})
        pending.clear()

    for key, tensor in tensors:
        pending[key] = tensor
        if sum(t.numel() * t.element_size() for t in pending.values()) > FILE_BYTES:
            flush()
    if pending:
        flush()
    return weight_map


def _expand_report(staged: StagedOutput, artefact: str, base: str, task: int,
                   meta: dict[str, Any], seconds: float) -> ExpandReport:
    """A report for the rebuilt model: it makes the directory recognisable as ours (so
    --overwrite may replace it) and verifiable (`verify` checks every file it lists). Every
    file is read back here, so nothing is committed that was not written."""
    names = staged.staged_names()
    tensors = [FileRecord(**describe_file(staged.file(n))) for n in names
               if n.endswith(".safetensors")]
    small = [FileRecord(**describe_file(staged.file(n))) for n in names
             if n in ("model.safetensors.index.json", "config.json")]
    return ExpandReport(method=meta.get("method", "tsv_c"), task=task,
                        num_tasks=meta["num_tasks"], outputs=tensors, metadata_files=small,
                        inputs={"base": {"location": base}, "artefact": {"location": artefact}},
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        timings_s={"total": round(seconds, 4)})
