"""Ray Jobs entrypoint for a merge.

    ray job submit --working-dir . -- python ray_jobs/merge.py --config cfg.yaml

Same options as `merge-pipeline merge`. Inside a Ray job, `ray.init()` joins the job's cluster,
so `--address` defaults to "auto" here instead of starting an embedded cluster.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402


def job_argv(argv: list[str]) -> list[str]:
    in_ray_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    if in_ray_job and "--address" not in argv and "--engine" not in argv:
        argv = [*argv, "--address", "auto"]
    return ["merge", *argv]


if __name__ == "__main__":
    sys.exit(main(job_argv(sys.argv[1:])))
