"""`merge-pipeline verify DIR`: does an output still hold what its merge report says?

Checks every file's size and sha256 against the report, re-parses every header, checks that the
index and the files agree, that every key of the base is there with its shape and dtype (for a
merged model, when the base is reachable), and that every floating tensor is finite. Returns the
list of problems; empty means the output is sound.
"""

from __future__ import annotations

import json
import os

from .checkpoints.reader import open_checkpoint
from .checkpoints.scan import scan_file
from .errors import InputError, PipelineError


def verify_output(directory: str) -> list[str]:
    report_path = os.path.join(directory, "merge_report.json")
    try:
        with open(report_path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{directory}: no merge_report.json (not an output of this pipeline)")
    except ValueError as exc:
        raise InputError(f"{report_path}: not valid JSON ({exc})") from None
    problems = []
    for entry in report["outputs"]:
        path = os.path.join(directory, entry["name"])
        try:
            scanned = scan_file(path)
        except PipelineError as exc:
            problems.append(str(exc))
            continue
        if scanned["size"] != entry["size"]:
            problems.append(f"{path}: {scanned['size']} bytes, report says {entry['size']}")
        if scanned["sha256"] != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the report")
        problems += [f"{path}: key {k!r} contains NaN or Inf" for k in scanned["nonfinite"]]
    if problems:
        return problems
    with open_checkpoint(directory) as merged:
        listed = {os.path.basename(f) for f in merged.files}
        reported = {e["name"] for e in report["outputs"]}
        if listed != reported:
            problems.append(f"{directory}: index lists {sorted(listed)}, report {sorted(reported)}")
        base_location = report["inputs"]["base"]["location"]
        if report["output"] == "model" and _reachable(base_location):
            problems += _compare_keys(merged, base_location)
    return problems


def _reachable(location: str) -> bool:
    return "://" in location or os.path.exists(location)


def _compare_keys(merged, base_location: str) -> list[str]:
    problems = []
    with open_checkpoint(base_location) as base:
        keys = set(merged.keys())
        for key in base.keys():
            if key not in keys:
                problems.append(f"{merged.location}: key {key!r} of the base is missing")
            elif merged.spec(key) != base.spec(key):
                problems.append(f"{merged.location}: key {key!r} is {merged.spec(key)}, "
                                f"the base has {base.spec(key)}")
        extra = sorted(keys - set(base.keys()))
        if extra:
            problems.append(f"{merged.location}: keys the base lacks: {extra[:5]}")
    return problems
