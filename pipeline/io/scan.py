"""One read of an input file that yields its sha256 and the keys holding NaN or Inf.

The report wants every input's checksum and the merge must refuse non-finite weights before any
compute; both need the bytes, so one pass does both. A safetensors data section is its tensors
back to back (the header parser guarantees it), so hashing the header and then each tensor in
offset order hashes the file exactly, while each tensor is checked as it goes by. Memory stays
at one tensor.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from pipeline.io.reader import load_torch_state_dict
from pipeline.io.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from pipeline.io.storage import open_range_reader

CHUNK = 16 << 20


def scan_file(location: str) -> dict[str, Any]:
    """{"path", "size", "sha256", "nonfinite": [keys]} of one checkpoint file."""
    if location.endswith(".safetensors"):
        return _scan_safetensors(location)
    digest, size = _hash_chunks(location)
    tensors = load_torch_state_dict(location)
    bad = sorted(k for k, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    return {"path": location, "size": size, "sha256": digest, "nonfinite": bad}


def _scan_safetensors(location: str) -> dict[str, Any]:
    with SafetensorsFile(location) as f:
        entries = sorted(f.entries.items(), key=lambda item: item[1].start)
        data_start = entries[0][1].start if entries else f.size
        digest = hashlib.sha256(f._reader.read_range(0, data_start))
        bad = []
        for key, entry in entries:
            tensor = f.read(key)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data
                          if tensor.numel() else b"")
            if entry.dtype in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
                bad.append(key)
        return {"path": location, "size": f.size, "sha256": digest.hexdigest(),
                "nonfinite": sorted(bad)}


def describe_file(location: str) -> dict[str, Any]:
    """{"name", "size", "sha256"} of any file, read in chunks (outputs are read back with it
    before they are committed, and `verify` checks them against it)."""
    digest, size = _hash_chunks(location)
    return {"name": location.rstrip("/").rsplit("/", 1)[-1], "size": size, "sha256": digest}


def _hash_chunks(location: str) -> tuple[str, int]:
    reader = open_range_reader(location)
    digest = hashlib.sha256()
    try:
        for offset in range(0, reader.size, CHUNK):
            digest.update(reader.read_range(offset, min(CHUNK, reader.size - offset)))
    finally:
        reader.close()
    return digest.hexdigest(), reader.size
