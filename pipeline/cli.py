"""`merge-pipeline` / `python -m pipeline`: one command, several subcommands.

Errors we raise on purpose (bad input, bad options) print one line and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import InputError, PipelineError
from .ops_commands import add_history_option, record


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same fields as these flags")
    p.add_argument("--base", help="pre-trained checkpoint (HF directory, .safetensors, .pt/.bin)")
    p.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoints, one per task")
    p.add_argument("--method", help="average, task_arithmetic, ties, tsv_m, iso_c, iso_cts, tsv_c")
    p.add_argument("--alpha", type=float, help="scaling of the merged task vector")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. common_space_fraction=0.8 or k=20")
    p.add_argument("--out", help="output directory (appears only when complete)")
    p.add_argument("--output", choices=["model", "task_vector"],
                   help="write the merged model (default) or the merged task vector itself")
    p.add_argument("--exclude", nargs="*", help="substrings of 2-D keys merged by mean, not SVD "
                                                "(default: text_projection)")
    p.add_argument("--compute-dtype", choices=["float32", "float64"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="math threads per worker (fixed, for "
                                               "bit-identical results at any worker count)")
    p.add_argument("--fuse-qkv", action="store_true", default=None,
                   help="merge HF q/k/v projections as one fused matrix, like open_clip")
    p.add_argument("--max-shard-size", help="largest output file, e.g. 2GB")
    p.add_argument("--engine", choices=["ray", "local"], help="ray (default) or in-process")
    p.add_argument("--workers", type=int, help="parallel shards (default: what Ray offers)")
    p.add_argument("--address", help="Ray cluster to join (auto, ray://host:10001); "
                                     "default: start an embedded local cluster")
    p.add_argument("--gpus-per-task", type=float, help="GPU share per task when GPUs exist")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", default=None,
                   help="reuse the verified files of an interrupted run of the same merge")
    add_history_option(p)
    p.add_argument("--no-input-scan", dest="scan_inputs", action="store_false", default=None,
                   help="skip the up-front read of every input (sha256 for the report, NaN/Inf "
                        "check); workers still refuse non-finite tensors as they read them")


def merge_config_from_args(args: argparse.Namespace):
    from .config import build_config, load_yaml, parse_params
    file_values = load_yaml(args.config) if args.config else {}
    overrides = {name: getattr(args, name) for name in (
        "base", "finetuned", "method", "alpha", "out", "output", "exclude", "compute_dtype",
        "device", "threads", "fuse_qkv", "max_shard_size", "engine", "workers", "address",
        "gpus_per_task", "overwrite", "resume", "scan_inputs")}
    params = dict(file_values.pop("params", None) or {})
    params.update(parse_params(args.param))
    overrides["params"] = params
    return build_config(file_values, overrides, source=args.config or "command line")


def cmd_merge(args: argparse.Namespace) -> int:
    from .engine import run_merge
    config = merge_config_from_args(args)
    report = run_merge(config)
    print(summary_line(report, config.out))
    from .run_rows import merge_rows
    record(args.history, "merge", lambda ctx: merge_rows(ctx, report, config.base))
    return 0


def summary_line(report: dict, out: str) -> str:
    engine = report["engine"]
    return (f"{report['method']}: {report['num_tasks']} tasks -> {out} "
            f"({len(report['outputs'])} file(s), {engine['workers']} worker(s) on "
            f"{engine['device']}, {report['timings_s']['total']:.1f} s, "
            f"{report['numerics']['svd_calls']} SVDs)")


def cmd_expand(args: argparse.Namespace) -> int:
    from .tsv_c_artefact import expand_task
    print(expand_task(args.artefact, args.base, args.task, args.out, args.overwrite))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_output
    problems = verify_output(args.directory)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.directory}: ok (checksums, headers, index, keys, finite values)")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args.workdir, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge fine-tuned checkpoints into one model")
    _add_merge_options(merge)
    merge.set_defaults(func=cmd_merge)
    expand = sub.add_parser("expand", help="rebuild one task's model from a TSV-C artefact")
    expand.add_argument("--artefact", required=True)
    expand.add_argument("--base", required=True)
    expand.add_argument("--task", type=int, required=True, help="task index, from 0")
    expand.add_argument("--out", required=True)
    expand.add_argument("--overwrite", action="store_true")
    expand.set_defaults(func=cmd_expand)
    verify = sub.add_parser("verify", help="check an output against its merge_report.json")
    verify.add_argument("directory")
    verify.set_defaults(func=cmd_verify)
    demo = sub.add_parser("demo", help="merge a built-in example end to end on local Ray")
    demo.add_argument("--workdir", default=os.path.join(".cache", "demo"))
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    from .evaluation.commands import add_parsers
    from .ops_commands import add_parsers as add_ops_parsers
    add_parsers(sub)
    add_ops_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
