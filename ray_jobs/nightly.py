"""Ray Jobs entrypoint for the nightly benchmark.

    ray job submit --working-dir . -- python ray_jobs/nightly.py --config cluster/nightly.yaml \
        --history s3://bucket/merge-history --report /shared/reports/latest.html

Runs the configured matrix (suites x task counts x methods), appends one run to the results
history, writes the HTML report, and exits 1 when a regression threshold is crossed (3 when a
cell failed, 2 on a bad configuration), so the scheduler marks the night red. Same options as
`merge-pipeline nightly`; inside a Ray job the work joins the job's cluster.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli.main import main  # noqa: E402
from pipeline.cli.ray_job import job_argv  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(job_argv("nightly", sys.argv[1:])))
