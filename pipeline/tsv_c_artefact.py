"""Serving a TSV-C artefact: rebuild task t's model as theta_0 + tau_t^c.

The artefact (written by `merge --method tsv_c`) stores, per matrix and task, the top-k factors
U (m x k), s (k) and Vh (k x n), stacked over tasks, plus the other keys' task vectors whole,
and `tsv_c.json` saying how fused units split back into stored keys.
"""

from __future__ import annotations

import json

import torch

from .checkpoints import StagedOutput, open_checkpoint
from .checkpoints.safetensors_io import DTYPES, write_safetensors
from .checkpoints.storage import join, read_bytes
from .errors import InputError
from .methods.tsv import tsv_c_reconstruct

ARTEFACT_META = "tsv_c.json"
FILE_BYTES = 1 << 30


def expand_task(artefact: str, base: str, task: int, out: str, overwrite: bool = False) -> str:
    """Write task `task`'s (0-based) model from the artefact and the base; returns `out`."""
    try:
        meta = json.loads(read_bytes(join(artefact, ARTEFACT_META)))
    except InputError:
        raise InputError(f"{artefact}: not a TSV-C artefact (no {ARTEFACT_META})") from None
    if not 0 <= task < meta["num_tasks"]:
        raise InputError(f"{artefact}: task {task} out of range (artefact has "
                         f"{meta['num_tasks']} tasks, numbered from 0)")
    compute = DTYPES[meta["compute_dtype"]]
    with open_checkpoint(artefact) as factors, open_checkpoint(base) as theta0, \
            StagedOutput(out, overwrite) as staged:
        pending: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        files = 0

        def flush() -> None:
            nonlocal files
            files += 1
            name = f"model-{files:05d}.safetensors"
            write_safetensors(staged.file(name), pending)
            weight_map.update({k: name for k in pending})
            pending.clear()

        for name, unit in meta["units"].items():
            sources = unit["sources"]
            base_parts = [theta0.read(k) for k in sources]
            if unit["kind"] == "copy":
                pending.update(zip(sources, base_parts))
            else:
                if unit["kind"] == "matrix":
                    tau = tsv_c_reconstruct(factors.read(f"{name}::U")[task],
                                            factors.read(f"{name}::S")[task],
                                            factors.read(f"{name}::Vh")[task])
                else:
                    tau = factors.read(f"{name}::tau")[task]
                theta = torch.cat(base_parts).to(compute) + tau.to(compute)
                pieces = theta.split(unit["rows"]) if len(sources) > 1 else [theta]
                for key, piece, part in zip(sources, pieces, base_parts):
                    pending[key] = piece.reshape(part.shape).to(part.dtype)
            if sum(t.numel() * t.element_size() for t in pending.values()) > FILE_BYTES:
                flush()
        if pending:
            flush()
        staged.write_json("model.safetensors.index.json",
                          {"metadata": {"source": artefact, "task": task},
                           "weight_map": dict(sorted(weight_map.items()))})
        if theta0.config_location:
            staged.copy_in(theta0.config_location, "config.json")
        return staged.commit()
