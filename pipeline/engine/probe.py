"""Before any compute: prove that every node that will run shards can do its part.

A cluster without a shared filesystem is the common case on launcher and KubeRay clusters: a
worker there cannot read the driver's local paths, and a file it writes lands on its own disk.
So the driver writes a marker (a random token) beside the output, and a probe task pinned to
every node that can run a shard checks that it reads the marker, writes one back that the
driver then sees, reads the first bytes of every input file and, for a GPU run, sees a CUDA
device. A node that cannot read an input, or lacks CUDA, is an error naming the node and the
path (exit 2). A node that cannot share the output location rules out `--assembly workers`
(refused, naming the node) and makes `auto` let the driver write the files from the tensors
the workers return.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass

from pipeline.errors import InputError
from pipeline.io.output import probe_location
from pipeline.io.storage import (
    is_local,
    join,
    make_dirs,
    open_range_reader,
    read_bytes,
    remove_tree,
    write_bytes,
)
from pipeline.runtime.executors import current_node_id

MARKER = "driver-marker"


@dataclass(frozen=True)
class HiddenPath:
    """Test injection: the probe on node `node_id` behaves as if `prefix` did not exist there,
    as on a node without the driver's filesystem (one machine cannot unmount a path for one
    Ray node)."""

    node_id: str
    prefix: str


@dataclass(frozen=True)
class NodeProbe:
    """What one node found."""

    node_id: str
    host: str
    sees_output: bool  # it read the driver's marker and wrote its own
    problems: tuple[str, ...]  # inputs it cannot read, no CUDA on a GPU run


def probe_node(directory: str, token: str, inputs: tuple[str, ...], device: str,
               hidden: HiddenPath | None = None) -> NodeProbe:
    """Runs on a node: the checks in the module docstring, reported, never raised."""
    node = current_node_id()

    def hidden_here(location: str) -> bool:
        return (hidden is not None and hidden.node_id == node
                and location.startswith(hidden.prefix))

    sees = False
    if not hidden_here(directory):
        try:
            sees = read_bytes(join(directory, MARKER)).decode() == token
            if sees:
                write_bytes(_reply(directory, node), token.encode())
        except (OSError, InputError):
            sees = False
    problems = []
    for location in inputs:
        try:
            if hidden_here(location):
                raise InputError(f"{location}: no such file")
            reader = open_range_reader(location)
            try:
                reader.read_range(0, min(8, reader.size))
            finally:
                reader.close()
        except (OSError, InputError) as exc:
            problems.append(f"cannot read the input {location} ({exc})")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            problems.append("--device cuda, but torch sees no CUDA device there")
    return NodeProbe(node, socket.gethostname(), sees, tuple(problems))


def check_nodes(executor, out: str, inputs: list[str], device: str, assembly: str,
                hidden: HiddenPath | None = None) -> str:
    """Probe every node that will run shards; return the assembly to use ("workers" or
    "driver"), or raise `InputError` naming the first node and path that fail."""
    directory = probe_location(out)
    token = secrets.token_hex(16)
    make_dirs(directory)
    try:
        write_bytes(join(directory, MARKER), token.encode())
        probes = executor.each_node(probe_node, (directory, token, tuple(inputs), device,
                                                 hidden))
        blind = [p for p in probes if not (p.sees_output and _driver_sees(directory, p, token))]
    finally:
        remove_tree(directory)
    problems = [f"node {p.host} ({p.node_id[:12]}): {problem}"
                for p in probes for problem in p.problems]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    if assembly == "auto":
        # Measured (benchmarks/scaleout_bench.py, README): to a local --out the driver writing
        # is as fast as the workers or faster (its writes overlap their compute) and needs no
        # shared filesystem; to an object store the workers upload in parallel, and each byte
        # crosses the network once instead of twice.
        assembly = "workers" if not is_local(out) and not blind else "driver"
    if assembly == "workers" and blind:
        node = blind[0]
        raise InputError(f"node {node.host} ({node.node_id[:12]}): does not share the output "
                         f"location {out} with the driver (it cannot read the driver's probe "
                         f"in {directory}, or what it writes there does not reach the driver); "
                         f"--assembly workers needs a filesystem every node sees or an "
                         f"object-store --out; --assembly driver needs neither")
    return assembly


def _reply(directory: str, node_id: str) -> str:
    """Where a node's probe writes back the driver's token."""
    return join(directory, f"node-{node_id or 'local'}")


def _driver_sees(directory: str, probe: NodeProbe, token: str) -> bool:
    try:
        return read_bytes(_reply(directory, probe.node_id)).decode() == token
    except (OSError, InputError):
        return False
