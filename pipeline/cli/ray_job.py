"""What the `ray_jobs/` entrypoints share: inside a Ray job, join the job's cluster.

`ray job submit` runs the entrypoint on the cluster with RAY_JOB_ID (or RAY_ADDRESS) set;
an embedded local cluster there would ignore the cluster's GPUs, so `--address auto` is added
unless the user chose an address or an engine.
"""

from __future__ import annotations

import os


def job_argv(command: str, argv: list[str]) -> list[str]:
    """The `merge-pipeline` arguments for `command argv...`, run by a Ray job or by hand."""
    in_ray_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    if in_ray_job and "--address" not in argv and "--engine" not in argv:
        argv = [*argv, "--address", "auto"]
    return [command, *argv]
