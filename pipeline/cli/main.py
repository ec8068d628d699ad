"""`merge-pipeline` / `python -m pipeline`: one command, several subcommands.

Errors we raise on purpose (bad input, bad options) print one line and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pipeline.cli.ops import add_history_option, record
from pipeline.cli.ops import add_parsers as add_ops_parsers
from pipeline.engine.config import MergeConfig, add_options, load_merge_config
from pipeline.engine.driver import run_merge
from pipeline.engine.expand import expand_task
from pipeline.engine.records import MergeReport
from pipeline.engine.verify import verify_output
from pipeline.errors import InputError, PipelineError
from pipeline.methods.registry import get_method, method_names
from pipeline.runtime import interrupts, ray_cluster

EXIT_CODES = """exit codes:
  0    success (verify: the output is sound)
  1    a failure that is not the input's fault; verify: the output is damaged
  2    bad input or options (one line says which); nothing was written
  130  interrupted by Ctrl-C (SIGINT); finished files are kept for --resume
  143  terminated (SIGTERM); finished files are kept for --resume"""


def _merge_epilog() -> str:
    lines = ["methods (parameters and defaults; --param NAME=VALUE):"]
    for name in method_names():
        method = get_method(name)
        params = ", ".join(f"{k}={v}" for k, v in method.defaults.items()) or "no parameters"
        if method.fixed_alpha is None:
            alpha = f"alpha searched in {method.alpha_grid[0]:.3g}..{method.alpha_grid[-1]:.3g}"
        else:
            at_2, at_4 = method.fixed_alpha(2), method.fixed_alpha(4)
            alpha = "alpha fixed to " + (f"{at_2:g}" if at_2 == at_4 else
                                         "1/T" if (at_2, at_4) == (0.5, 0.25) else "f(T)")
        lines.append(f"  {name:<16} {params}; {alpha}")
    return "\n".join(lines) + "\n\n" + EXIT_CODES


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML",
                   help="YAML file whose fields are the long flag names; flags given win")
    add_options(p, MergeConfig)
    add_history_option(p)


def merge_config_from_args(args: argparse.Namespace) -> MergeConfig:
    return load_merge_config(args.config, vars(args))


def cmd_merge(args: argparse.Namespace) -> int:
    config = merge_config_from_args(args)
    report = run_merge(config)
    print(summary_line(report, config.out))

    def rows(ctx: Any) -> list[dict]:
        from pipeline.history.rows import merge_rows  # 3 s of imports (models): --history only
        return merge_rows(ctx, report, config.base)

    record(args.history, "merge", rows)
    return 0


def summary_line(report: MergeReport, out: str) -> str:
    engine = report.engine
    return (f"{report.method}: {report.num_tasks} tasks -> {out} "
            f"({len(report.outputs)} file(s), {engine.workers} worker(s) on "
            f"{engine.device}, {report.timings_s['total']:.1f} s, "
            f"{report.numerics.svd_calls} SVDs)")


def cmd_expand(args: argparse.Namespace) -> int:
    print(expand_task(args.artefact, args.base, args.task, args.out, args.overwrite))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    result = verify_output(args.directory)
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    for skipped in result.not_checked:
        print(f"not checked: {skipped}")
    if result.ok:
        print(f"{args.directory}: ok ({'; '.join(result.checked)})")
    return 0 if result.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.bench.demo import run_demo
    return run_demo(args.workdir, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge fine-tuned checkpoints into one model",
                           description="Merge N fine-tuned checkpoints of one architecture "
                                       "into one model, with no training.",
                           epilog=_merge_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_options(merge)
    merge.set_defaults(func=cmd_merge)
    expand = sub.add_parser("expand", help="rebuild one task's model from a TSV-C artefact",
                            epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    expand.add_argument("--artefact", required=True, metavar="DIR",
                        help="output of `merge --method tsv_c` [required]")
    expand.add_argument("--base", required=True, metavar="PATH",
                        help="the pre-trained checkpoint the artefact was made from [required]")
    expand.add_argument("--task", type=int, required=True, metavar="T",
                        help="task index, from 0 [required]")
    expand.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: a local path or a pyarrow.fs URI "
                             "(s3://bucket/prefix, file://) [required]")
    expand.add_argument("--overwrite", action="store_true",
                        help=MergeConfig.model_fields["overwrite"].description)
    expand.set_defaults(func=cmd_expand)
    verify = sub.add_parser("verify", help="check an output against its merge_report.json",
                            epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("directory", help="an output directory of merge or expand")
    verify.set_defaults(func=cmd_verify)
    demo = sub.add_parser("demo", help="merge a built-in example end to end on local Ray")
    demo.add_argument("--workdir", default=os.path.join(".cache", "demo"))
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    from pipeline.cli.evaluation import add_parsers
    add_parsers(sub)
    add_ops_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Only this function prints errors: one line each (bugs keep their
    traceback). Ctrl-C and SIGTERM unwind as exceptions (`interrupts`), then exit 130 / 143,
    whatever exception the signal became on its way up; an embedded Ray cluster this process
    started is shut down on every way out.

    Called as the program (no `argv`: the console script, `python -m pipeline`), it ends the
    process itself once it has returned its code (`_exit_now`)."""
    phase("main")
    code = _run(argv)
    if argv is None:
        _exit_now(code)
    return code


def phase(name: str) -> None:
    """With MERGE_PIPELINE_PHASES=1, print when a phase of this process ends, as
    `merge-pipeline phase NAME MONOTONIC` on stderr: the system-wide monotonic clock, so that
    a parent process (benchmarks/fixed_costs_bench.py) can time what no report can see (the
    imports before `main`, the shutdown, the interpreter's exit)."""
    if os.environ.get("MERGE_PIPELINE_PHASES") == "1":
        print(f"merge-pipeline phase {name} {time.monotonic():.4f}", file=sys.stderr, flush=True)


def _exit_now(code: int) -> None:
    """End the process without Python's finalization: after the exit handlers ran and the
    output was flushed, tearing down torch's and Ray's modules and objects one by one took
    1.5-2.5 s on 2 cores (measured), and nothing is left to do by then: the output is
    committed (or the error said) and the embedded cluster is gone."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed (a closed pipe): nothing to say
            stream.flush()
    os._exit(code)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    with interrupts.signals_unwind() as received:
        try:
            return args.func(args)
        except BaseException as exc:
            signum = received.signum
            if signum is None and isinstance(exc, KeyboardInterrupt):
                signum = received.of(exc)
            if signum is not None:
                ray_cluster.shutdown_started()  # before the line, so that it is the last word
                print(interrupts.describe(signum, exc, resumable=hasattr(args, "resume")),
                      file=sys.stderr)
                return interrupts.exit_code(signum)
            if isinstance(exc, InputError):
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if isinstance(exc, PipelineError):
                print(f"error: {exc}{interrupts.kept_note(exc, '; ')}", file=sys.stderr)
                return 1
            if isinstance(exc, Exception) and getattr(exc, "staging_dir", None):
                exc.add_note(interrupts.kept_note(exc))  # a bug: keep the traceback, add where
            raise
        finally:
            phase("command")
            ray_cluster.shutdown_started()
            phase("shutdown")


if __name__ == "__main__":
    sys.exit(main())
