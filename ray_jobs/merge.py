"""Ray Jobs entrypoint for a merge.

    ray job submit --working-dir . -- python ray_jobs/merge.py --config cfg.yaml

Same options as `merge-pipeline merge`. Inside a Ray job, `ray.init()` joins the job's cluster,
so `--address` defaults to "auto" here instead of starting an embedded cluster.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli.main import main  # noqa: E402
from pipeline.cli.ray_job import job_argv  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(job_argv("merge", sys.argv[1:])))
