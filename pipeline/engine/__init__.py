"""The merge engine: typed options, the plan, the shard worker, the driver, the typed records
it writes, `verify` and TSV-C `expand`.

`run_merge(MergeConfig(...))` is the entry point; it returns the `MergeReport`.
"""

from pipeline.engine.config import ClusterOptions, MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.engine.records import MergeReport

__all__ = ["ClusterOptions", "MergeConfig", "MergeReport", "run_merge"]
