"""Merge options: one dataclass, filled from a YAML file and/or command-line flags.

The YAML fields are exactly the long flag names (dashes or underscores), so a config file is a
saved command line; flags given explicitly override the file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .errors import InputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class MergeConfig:
    base: str = ""
    finetuned: list[str] = field(default_factory=list)
    method: str = ""
    out: str = ""
    alpha: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # "model": theta_0 + alpha * tau_M; "task_vector": tau_M itself, for alpha sweeps.
    output: str = "model"
    exclude: list[str] = field(default_factory=lambda: ["text_projection"])
    compute_dtype: str = "float32"
    device: str = "auto"
    threads: int = 1
    fuse_qkv: bool = False
    max_shard_size: str = "4GB"
    engine: str = "ray"
    workers: int | None = None
    address: str | None = None
    gpus_per_task: float = 1.0
    overwrite: bool = False
    # Reuse the verified files of an interrupted run of the same merge.
    resume: bool = False
    # Read every input once before any compute: sha256 for the report, NaN/Inf refused.
    scan_inputs: bool = True

    def validate(self) -> None:
        missing = [name for name in ("base", "method", "out") if not getattr(self, name)]
        if missing:
            raise InputError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
        if not self.finetuned:
            raise InputError("no fine-tuned checkpoints given (--finetuned PATH [PATH ...]): "
                             "merging needs at least one task")
        if self.output not in ("model", "task_vector"):
            raise InputError(f"--output must be 'model' or 'task_vector', got {self.output!r}")
        if self.compute_dtype not in ("float32", "float64"):
            raise InputError(f"--compute-dtype must be float32 or float64, "
                             f"got {self.compute_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.engine not in ("ray", "local"):
            raise InputError(f"--engine must be ray or local, got {self.engine!r}")
        if self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if not 0 < self.gpus_per_task <= 1 and not float(self.gpus_per_task).is_integer():
            raise InputError(f"--gpus-per-task must be a fraction in (0, 1] or a whole number, "
                             f"got {self.gpus_per_task}")
        if self.alpha is not None and not 0 < self.alpha < float("inf"):
            raise InputError(f"--alpha must be a finite number > 0, got {self.alpha}")
        parse_size(self.max_shard_size)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


def parse_size(text: str | int) -> int:
    if isinstance(text, int) and text > 0:
        return text
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").upper() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"not a size: {text!r} (examples: 500MB, 4GB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--param expects name=value, got {item!r}")
        params[name.strip()] = value.strip()
    return params


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: config file does not exist") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any],
                 source: str = "config") -> MergeConfig:
    """File values, then explicit overrides (None means 'not given')."""
    names = {f.name for f in dataclasses.fields(MergeConfig)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise InputError(f"{source}: unknown option(s) {unknown}; known: {sorted(names)}")
    values = dict(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("finetuned"), str):
        values["finetuned"] = [values["finetuned"]]
    if isinstance(values.get("exclude"), str):
        values["exclude"] = [values["exclude"]]
    config = MergeConfig(**values)
    config.validate()
    return config
