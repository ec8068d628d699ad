"""moto's standalone S3 server on 127.0.0.1, for the tests and the scale-out benchmark."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_s3_at(port: int) -> None:
    """Every s3:// URI of this process and of the Ray workers it starts later goes to the
    local server: endpoint and dummy credentials in the environment, no metadata lookups."""
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")


@contextlib.contextmanager
def running_s3_server(port: int, bucket: str) -> Iterator[str]:
    """Start the server, create `bucket`, yield "s3://bucket"; stop the server after."""
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 server (moto_server) did not start") from None
                time.sleep(0.1)
        import pyarrow.fs as pafs
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          region="us-east-1", access_key="test", secret_key="test",
                          allow_bucket_creation=True).create_dir(bucket)
        yield f"s3://{bucket}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def server_cpu_seconds(port: int) -> float:
    """CPU seconds the moto server on `port` has used so far (Linux /proc): it shares this
    machine's cores with the merge, so a benchmark reports it beside its wall times."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            if not any(a.endswith(b"moto_server") for a in args) or str(port).encode() not in args:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return 0.0
