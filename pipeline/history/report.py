"""`merge-pipeline report`: one self-contained HTML page from the results history.

Plots are PNGs inlined as data URIs and the styles are inline, so the page can be mailed,
attached to a CI run or opened from object storage with nothing else beside it.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from pipeline.history.regressions import Regression, Thresholds, detect_regressions
from pipeline.history.store import MEAN
from pipeline.io import storage
from pipeline.io.output import write_file_atomic

REFERENCES = ("zero_shot", "finetuned")


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    return plt


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    """One colour per method for every panel, so a single legend serves the whole figure."""
    import matplotlib
    palette = matplotlib.colormaps["tab10"](range(10))
    names = sorted(set(labels) - {"zero_shot"})
    colors: dict[str, Any] = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    colors["zero_shot"] = "0.55"
    return colors


def _legend(fig, axes) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", frameon=False,
               ncol=min(len(handles), 7), bbox_to_anchor=(0.5, 1.0), fontsize=9)


def _cells(rows: Iterable[dict]) -> list[tuple[str, int]]:
    return sorted({(r["suite"], r["num_tasks"]) for r in rows})


def _grid(plt, count: int, width: float = 6.0, height: float = 3.6):
    cols = min(count, 2)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def accuracy_over_time_png(bench: list[dict]) -> str | None:
    """Mean normalized accuracy per method, night after night, one panel per suite and T."""
    means = [r for r in bench if r["task"] == MEAN and r["normalized_accuracy"] is not None
             and r["method"] != "finetuned"]
    if not means:
        return None
    plt = _pyplot()
    cells = _cells(means)
    fig, axes = _grid(plt, len(cells))
    colors = _colors(r["method"] for r in means)
    for ax, (suite, count) in zip(axes, cells):
        series: dict[str, list[tuple[dt.datetime, float]]] = defaultdict(list)
        for r in means:
            if (r["suite"], r["num_tasks"]) == (suite, count):
                series[r["method"]].append((r["timestamp"], 100 * r["normalized_accuracy"]))
        for method, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=method, color=colors[method],
                    linestyle="--" if method == "zero_shot" else "-")
        ax.set_title(f"{suite}, T={count}")
        ax.set_ylabel("normalized accuracy (%)")
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    _legend(fig, axes)
    return _figure_png(fig)


def latest_per_task_png(latest: list[dict]) -> str | None:
    """The latest night, per task: which task each method gives up."""
    rows = [r for r in latest if r["task"] != MEAN and r["normalized_accuracy"] is not None
            and r["method"] != "finetuned"]
    if not rows:
        return None
    plt = _pyplot()
    cells = _cells(rows)
    fig, axes = _grid(plt, len(cells), width=7.0)
    colors = _colors(r["method"] for r in rows)
    for ax, (suite, count) in zip(axes, cells):
        cell = [r for r in rows if (r["suite"], r["num_tasks"]) == (suite, count)]
        tasks = list(dict.fromkeys(r["task"] for r in cell))
        methods = list(dict.fromkeys(r["method"] for r in cell))
        width = 0.8 / len(methods)
        values = {(r["method"], r["task"]): 100 * r["normalized_accuracy"] for r in cell}
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
            ax.bar(xs, [values.get((method, t), 0.0) for t in tasks], width, label=method,
                   color=colors[method])
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
        ax.axhline(100, color="0.3", linewidth=0.8)
        ax.set_title(f"{suite}, T={count}")
        ax.set_ylabel("normalized accuracy (%)")
    _legend(fig, axes)
    return _figure_png(fig)


def merge_time_png(rows: list[dict]) -> str | None:
    """Merge seconds per method over time, one panel per model size."""
    timed = [r for r in rows if r["merge_seconds"] is not None and r["task"] in (MEAN, None)]
    if not timed:
        return None
    plt = _pyplot()
    sizes = sorted({r["model_params"] or 0 for r in timed})
    fig, axes = _grid(plt, len(sizes))
    for ax, size in zip(axes, sizes):
        series: dict[str, list[tuple[dt.datetime, float]]] = defaultdict(list)
        for r in timed:
            if (r["model_params"] or 0) == size:
                series[f"{r['method']} T={r['num_tasks']}"].append(
                    (r["timestamp"], r["merge_seconds"]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                    label=label)
        ax.set_title(f"model with {size / 1e6:.2f} M parameters" if size else "model size unknown")
        ax.set_ylabel("merge time (s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    fig.autofmt_xdate()
    _legend(fig, axes)
    return _figure_png(fig)


def _table(head: Sequence[str], body: Iterable[Sequence[Any]], css: str = "") -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    lines = ["".join(f"<td>{html.escape(str(c))}</td>" for c in row) for row in body]
    rows = "".join(f"<tr>{line}</tr>" for line in lines)
    return f'<table class="{css}"><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>'


def _latest_summary(latest: list[dict]) -> str:
    means = [r for r in latest if r["task"] == MEAN]
    body = [(r["suite"], r["num_tasks"], r["method"],
             "-" if r["alpha"] is None else f"{r['alpha']:.3g}",
             f"{100 * r['accuracy']:.1f}",
             "-" if r["normalized_accuracy"] is None else f"{100 * r['normalized_accuracy']:.1f}",
             "-" if r["merge_seconds"] is None else f"{r['merge_seconds']:.2f}")
            for r in sorted(means, key=lambda r: (r["suite"], r["num_tasks"],
                                                  r["method"] not in REFERENCES, r["method"]))]
    return _table(("suite", "T", "method", "alpha", "accuracy %", "normalized %",
                   "merge s"), body)


def _value(metric: str, value: float) -> str:
    return f"{value:.2f} s" if metric == "merge_seconds" else f"{100 * value:.1f}%"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;
max-width:1300px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.bad td{background:#fde8e8}.ok{color:#1a7f37;font-weight:600}
.alert{color:#b42318;font-weight:600}img{max-width:100%}.meta{color:#666;font-size:13px}
"""


def render_report(history: pa.Table, thresholds: Thresholds,
                  regressions_of_latest: Sequence[Regression] | None = None,
                  failures: Sequence[dict[str, str]] = ()) -> str:
    """The page for the history's latest benchmark run (regressions computed if not given)."""
    rows = history.to_pylist()
    bench = [r for r in rows if r["kind"] == "bench"]
    latest_id = max(bench, key=lambda r: (r["timestamp"], r["run_id"]))["run_id"] if bench else None
    latest = [r for r in bench if r["run_id"] == latest_id]
    if regressions_of_latest is None:
        regressions_of_latest = (detect_regressions(history, latest_id, thresholds)
                                 if latest_id else [])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>merge-pipeline "
             f"nightly report</title><style>{STYLE}</style></head><body>",
             "<h1>merge-pipeline: nightly benchmark report</h1>",
             _run_summary(latest, bench, len(rows)),
             *_regressions_section(regressions_of_latest, thresholds)]
    if failures:
        parts.append("<h2>Failed cells</h2>")
        parts.append(_table(("cell", "error"), [(f["cell"], f["error"]) for f in failures],
                            css="bad"))
    figures = [("Normalized accuracy per method over time", accuracy_over_time_png(bench)),
               ("Latest run, per task", latest_per_task_png(latest)),
               ("Merge time per method and model size over time", merge_time_png(rows))]
    for title, png in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
                     if png else "<p class='meta'>No data yet.</p>")
    if latest:
        parts.append("<h2>Latest run, mean over tasks</h2>")
        parts.append(_latest_summary(latest))
    parts.append("</body></html>")
    return "\n".join(parts)


def _run_summary(latest: list[dict], bench: list[dict], num_rows: int) -> str:
    if not latest:
        return "<p class='meta'>No benchmark runs in the history yet.</p>"
    first = latest[0]
    hw = json.loads(first["hardware"] or "{}")
    gpus = ", GPUs: " + html.escape(", ".join(hw["gpus"])) if hw.get("gpus") else ""
    return (f"<p class='meta'>latest run <b>{html.escape(first['run_id'])}</b> at "
            f"{first['timestamp']:%Y-%m-%d %H:%M} UTC, commit "
            f"{html.escape(first['git_commit'][:12])}, on {html.escape(str(hw.get('cpu', '?')))}"
            f" ({hw.get('cpus', '?')} CPUs{gpus})."
            f" History: {len({r['run_id'] for r in bench})} benchmark run(s), "
            f"{num_rows} rows.</p>")


def _regressions_section(regressions: Sequence[Regression], thresholds: Thresholds
                         ) -> list[str]:
    parts = ["<h2>Regressions in the latest run</h2>"]
    if regressions:
        parts.append(f"<p class='alert'>{len(regressions)} regression(s) crossed "
                     f"the thresholds.</p>")
        parts.append(_table(("metric", "suite", "T", "method", "task", "current", "baseline",
                             "limit", "earlier runs"),
                            [(r.metric, r.suite, r.num_tasks, r.method, r.task,
                              _value(r.metric, r.current), _value(r.metric, r.baseline),
                              _value(r.metric, r.limit), r.baseline_runs)
                             for r in regressions], css="bad"))
    else:
        parts.append("<p class='ok'>None: every measurement is within its threshold "
                     "(or has no earlier run to compare with).</p>")
    parts.append(f"<p class='meta'>Thresholds: mean normalized accuracy may drop "
                 f"{thresholds.max_accuracy_drop:g} points, merge time may rise "
                 f"{100 * thresholds.max_time_increase:g}% and at least "
                 f"{thresholds.min_time_increase_s:g} s, against the median of the last "
                 f"{thresholds.window} earlier runs.</p>")
    return parts


def write_report(history: pa.Table, out: str, thresholds: Thresholds,
                 regressions_of_latest: Sequence[Regression] | None = None,
                 failures: Sequence[dict[str, str]] = ()) -> str:
    page = render_report(history, thresholds, regressions_of_latest, failures).encode()
    storage.make_dirs(storage.parent_and_name(out if storage.is_uri(out)
                                              else os.path.abspath(out))[0])
    write_file_atomic(out, lambda fh: fh.write(page))
    return out
