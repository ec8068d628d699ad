"""`merge-pipeline verify DIR`: does an output still hold what its merge report says?

DIR is a local directory or an object-store prefix; one whose commit did not finish (it holds
the commit marker) is not an output yet, whatever else is there.

Checks every tensor file's size and sha256 against the report, re-parses every header, checks
that every floating tensor is finite, that the small files the report lists (index,
config.json, tsv_c.json) are there with their recorded bytes, that the index and the files
agree, and, for a merged model whose base can be opened from here, that every key of the base
is there with its shape. The result says exactly which of these checks ran: a check that could
not run (an unreachable base) is reported as not done, never as passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.engine.records import OutputListing
from pipeline.errors import InputError, PipelineError
from pipeline.io.output import COMMIT_MARK, REPORT_NAME, output_state
from pipeline.io.reader import open_checkpoint
from pipeline.io.scan import describe_file, scan_file
from pipeline.io.storage import canonical, join, parent_and_name, read_bytes, size_of


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(directory: str) -> Verification:
    """Verify a local output directory or an object-store output prefix."""
    state = output_state(canonical(directory))
    if state in ("absent", "file"):
        raise InputError(f"{directory}: no such directory")
    if state not in ("ours", "uncommitted"):
        raise InputError(f"{directory}: no {REPORT_NAME} (not an output of merge-pipeline)")
    result = Verification()
    if state == "uncommitted":
        result.problems.append(f"{directory}: its commit did not finish (it holds "
                               f"{COMMIT_MARK}): not an output yet; the merge's --overwrite "
                               f"--resume finishes it")
        return result
    report_path = join(directory, REPORT_NAME)
    report = _read_report(report_path, result)
    if report is None:
        return result
    _check_tensor_files(directory, report, result)
    _check_metadata_files(directory, report, result)
    if result.problems:
        return result
    try:
        with open_checkpoint(directory) as merged:
            listed = sorted(parent_and_name(f)[1] for f in merged.files)
            reported = sorted(e.name for e in report.outputs)
            if listed != reported:
                result.problems.append(f"{directory}: the index lists {listed}, the report "
                                       f"{reported}")
            result.checked.append("index")
            if report.output == "model":
                _compare_keys(merged, report.base_location, result)
    except PipelineError as exc:
        result.problems.append(str(exc))
    return result


def _read_report(path: str, result: Verification) -> OutputListing | None:
    try:
        return OutputListing.from_json(read_bytes(path), path)
    except InputError as exc:  # a damaged report is a damaged output
        result.problems.append(str(exc))
    except OSError as exc:
        result.problems.append(f"{path}: unreadable ({exc.strerror or exc})")
    return None


def _check_tensor_files(directory: str, report: OutputListing, result: Verification) -> None:
    for entry in report.outputs:
        path = join(directory, entry.name)
        try:
            scanned = scan_file(path)
        except PipelineError as exc:
            result.problems.append(str(exc))
            continue
        if scanned["size"] != entry.size:
            result.problems.append(f"{path}: {scanned['size']} bytes, the report says "
                                   f"{entry.size}")
        elif scanned["sha256"] != entry.sha256:
            result.problems.append(f"{path}: sha256 differs from the report")
        result.problems += [f"{path}: key {k!r} contains NaN or Inf"
                            for k in scanned["nonfinite"]]
    result.checked.append(f"{len(report.outputs)} tensor file(s): size, sha256, header, "
                          f"finite values")


def _check_metadata_files(directory: str, report: OutputListing, result: Verification
                          ) -> None:
    if report.metadata_files is None:  # written before reports listed them
        result.not_checked.append("index/config.json bytes (the report predates their "
                                  "checksums)")
        return
    for entry in report.metadata_files:
        path = join(directory, entry.name)
        if size_of(path) is None:
            result.problems.append(f"{path}: missing (the report lists it)")
            continue
        found = describe_file(path)
        if (found["size"], found["sha256"]) != (entry.size, entry.sha256):
            result.problems.append(f"{path}: differs from the report (size or sha256)")
    if report.metadata_files:
        result.checked.append(", ".join(e.name for e in report.metadata_files))


def _compare_keys(merged, base_location: str | None, result: Verification) -> None:
    if not base_location:
        result.not_checked.append("keys against the base (the report names no base)")
        return
    try:
        with open_checkpoint(base_location) as base:
            base_specs = base.specs()
    except PipelineError as exc:
        result.not_checked.append(f"keys against the base ({exc})")
        return
    keys = set(merged.keys())
    for key, spec in base_specs.items():
        if key not in keys:
            result.problems.append(f"{merged.location}: key {key!r} of the base is missing")
        elif merged.spec(key).shape != spec.shape:
            result.problems.append(f"{merged.location}: key {key!r} has shape "
                                   f"{list(merged.spec(key).shape)}, the base has "
                                   f"{list(spec.shape)}")
    extra = sorted(keys - set(base_specs))
    if extra:
        result.problems.append(f"{merged.location}: keys the base lacks: {extra[:5]}")
    result.checked.append(f"every key of the base {base_location}")
