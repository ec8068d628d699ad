"""Ray Jobs entrypoint for evaluation: `evaluate`, `sweep`, `bench` or `suite`.

    ray job submit --working-dir . -- python ray_jobs/evaluate.py bench \
        --suite standard --tasks 8 --out /shared/bench/$(date +%F)
    ray job submit --working-dir . -- python ray_jobs/evaluate.py bench \
        --tasks-file s3://team/tasks/fusionbench-8.yaml --out s3://team/bench/$(date +%F)

Same options as the `merge-pipeline` subcommands (default subcommand: bench). Inside a Ray job
the actors join the job's cluster (`--address auto`) instead of starting an embedded one.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli.main import main  # noqa: E402
from pipeline.cli.ray_job import job_argv  # noqa: E402

SUBCOMMANDS = ("evaluate", "sweep", "bench", "suite")


def evaluate_argv(argv: list[str]) -> list[str]:
    """The subcommand is optional here: bench unless one of SUBCOMMANDS comes first."""
    if argv and argv[0] in SUBCOMMANDS:
        return job_argv(argv[0], argv[1:])
    return job_argv("bench", argv)


if __name__ == "__main__":
    sys.exit(main(evaluate_argv(sys.argv[1:])))
