"""Ray Jobs entrypoint for evaluation: `evaluate`, `sweep`, `bench` or `suite`.

    ray job submit --working-dir . -- python ray_jobs/evaluate.py bench \
        --suite standard --tasks 8 --out /shared/bench/$(date +%F)

Same options as the `merge-pipeline` subcommands (default subcommand: bench). Inside a Ray job
the actors join the job's cluster (`--address auto`) instead of starting an embedded one.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

SUBCOMMANDS = ("evaluate", "sweep", "bench", "suite")


def job_argv(argv: list[str]) -> list[str]:
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in SUBCOMMANDS else ("bench", argv)
    in_ray_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))
    if in_ray_job and "--address" not in rest and "--engine" not in rest:
        rest = [*rest, "--address", "auto"]
    return [command, *rest]


if __name__ == "__main__":
    sys.exit(main(job_argv(sys.argv[1:])))
