"""Checksums of checkpoint files: whole files (outputs, read back before a commit) and inputs
identified from their tensors' digests.

An input is read once per merge, by the workers, who hash each stored tensor as they read it
(`tensor_sha256`); an input file's digest is then `file_digest`: the sha256 of its header
followed by each tensor's sha256 in file order. Equal files have equal digests and any changed
byte changes it, but it is not the file's sha256sum. `scan_file` (one read that yields a whole
file's sha256 and its non-finite keys) serves `verify`, which checks outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.io.reader import load_torch_state_dict
from pipeline.io.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from pipeline.io.storage import open_range_reader

CHUNK = 16 << 20


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (before any dtype conversion): in a safetensors
    file, exactly its span of the data section."""
    return hashlib.sha256(_stored_bytes(tensor)).hexdigest()


def _stored_bytes(tensor: torch.Tensor):
    return tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""


def file_digest(header: bytes, tensor_digests: Sequence[str]) -> str:
    """An input file's `tensor_sha256`: sha256 of its header bytes followed by the raw 32-byte
    sha256 of each tensor in data order. Computed from digests the workers made while reading,
    so no byte is read twice for it."""
    digest = hashlib.sha256(header)
    for hexdigest in tensor_digests:
        digest.update(bytes.fromhex(hexdigest))
    return digest.hexdigest()


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
            digest.update(_stored_bytes(tensor))
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
