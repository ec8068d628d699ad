"""Merge options: one typed model, validated the same way from a YAML file and from flags.

`MergeConfig` is the single declaration of every merge option. The CLI's flags are generated
from it (`add_options`), a YAML config file uses the same field names, and both go through the
same validation (`load_merge_config`), so a quoted `"false"` in a file and `--alpha abc` on the
command line fail alike: one line naming the field and the value, exit code 2. Booleans come
only from real booleans (a string "no" is not false, it is a mistake); numbers that are
unambiguous are coerced (`1e-1`, which PyYAML reads as a string, is 0.1).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, TypeVar, cast

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import InputError
from pipeline.methods import DEFAULT_EXCLUDE, get_method

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; in a config file that is always a typo.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Number = Annotated[float, BeforeValidator(_not_bool)]
WholeNumber = Annotated[int, BeforeValidator(_not_bool)]
PathList = Annotated[list[str], BeforeValidator(_as_list)]
FloatDtype = Literal["float32", "float64", "float16", "bfloat16"]


def _flag(metavar: str | None = None, flag: str | None = None, group: str = "merge",
          negate: bool = False) -> dict[str, Any]:
    """CLI facts of a field, kept beside its declaration (see `add_options`)."""
    return {"metavar": metavar, "flag": flag, "group": group, "negate": negate}


class ClusterOptions(BaseModel):
    """Where work runs: declared once, shared by merge, evaluate, sweep, bench and nightly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    engine: Literal["auto", "ray", "local"] = Field(
        "auto", description="ray, local (in-process), or auto: a merge runs on Ray when "
                            "--address is given or it is large, in-process when small; "
                            "evaluation runs on Ray actors",
        json_schema_extra=_flag(group="cluster"))
    address: str | None = Field(None, description="Ray cluster to join (auto, HOST:PORT, "
                                                  "ray://HOST:10001); default: an embedded "
                                                  "local cluster",
                                json_schema_extra=_flag("ADDRESS", group="cluster"))
    workers: WholeNumber | None = Field(None, ge=1, description="parallel shards or evaluators "
                                                               "(default: what the cluster "
                                                               "offers)",
                                        json_schema_extra=_flag("N", group="cluster"))
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the math runs", json_schema_extra=_flag(group="cluster"))

    @property
    def actor_engine(self) -> Literal["ray", "local"]:
        """Evaluation and suite building: Ray actors unless in-process was asked for."""
        return "local" if self.engine == "local" else "ray"


class MergeConfig(ClusterOptions):
    """Every option of one merge. Field descriptions are the CLI's help texts."""

    base: str = Field(description="pre-trained checkpoint: HF model directory, .safetensors, "
                                  ".pt/.pth/.bin, or a pyarrow.fs URI",
                      json_schema_extra=_flag("PATH"))
    finetuned: PathList = Field(min_length=1, description="fine-tuned checkpoints, one per task "
                                                         "(same architecture as --base)",
                                json_schema_extra=_flag("PATH"))
    method: str = Field(description="merge method (see 'methods' below)",
                        json_schema_extra=_flag("NAME"))
    out: str = Field(description="output directory: a local path, or a pyarrow.fs URI "
                                 "(s3://bucket/prefix, gs://, hdfs://, file://); it appears "
                                 "only when complete",
                     json_schema_extra=_flag("DIR"))
    alpha: Number | None = Field(None, description="scaling of the merged task vector: "
                                                   "theta_0 + alpha * tau_M (needed by the "
                                                   "searched methods; `bench`/`sweep` choose it "
                                                   "on validation data)",
                                 json_schema_extra=_flag("A"))
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="method parameter NAME=VALUE (repeatable), e.g. "
                                               "common_space_fraction=0.8 or k=20",
                                   json_schema_extra=_flag("NAME=VALUE", flag="--param"))
    output: Literal["model", "task_vector"] = Field(
        "model", description="write the merged model, or the merged task vector tau_M itself "
                             "(for alpha sweeps)", json_schema_extra=_flag())
    exclude: PathList = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                              description="substrings of 2-D keys merged by the task mean "
                                          "instead of the SVD methods",
                              json_schema_extra=_flag("SUBSTRING"))
    fuse_qkv: StrictBool = Field(False, description="merge HF q/k/v projections as one fused "
                                                    "(3d x d) matrix, as the papers' open_clip "
                                                    "code does", json_schema_extra=_flag())
    compute_dtype: Literal["float32", "float64"] = Field(
        "float32", description="precision of the math (inputs are upcast to it)",
        json_schema_extra=_flag())
    output_dtype: FloatDtype | None = Field(
        None, description="dtype of the written floating tensors (default: the base's dtype "
                          "for a model, the compute dtype for a task vector)",
        json_schema_extra=_flag())
    max_shard_size: str | int = Field("4GB", description="largest output file, e.g. 2GB or "
                                                         "500MiB", json_schema_extra=_flag("SIZE"))
    overwrite: StrictBool = Field(False, description="replace an existing --out, but only a "
                                                     "previous output of merge-pipeline (it "
                                                     "has a merge_report.json) or an empty "
                                                     "directory; the old output is removed "
                                                     "only after the new one is complete",
                                  json_schema_extra=_flag())
    resume: StrictBool = Field(False, description="reuse the verified files of an interrupted "
                                                  "run of the same merge",
                               json_schema_extra=_flag())
    scan_inputs: StrictBool = Field(True, description="skip hashing the input tensors as the "
                                                      "workers read them: no input digests in "
                                                      "the report, no duplicate-task check, and "
                                                      "--resume trusts the inputs' sizes and "
                                                      "headers; NaN/Inf are refused either way",
                                    json_schema_extra=_flag(flag="--no-input-scan",
                                                            negate=True))
    threads: WholeNumber = Field(1, ge=1, description="math threads per worker, fixed so the "
                                                      "bits never depend on the worker count",
                                 json_schema_extra=_flag("N", group="cluster"))
    assembly: Literal["auto", "workers", "driver"] = Field(
        "auto", description="who writes the output files on Ray: workers (each writes its "
                            "shard's files; every node must see a local --out, e.g. on a "
                            "shared filesystem), driver (workers send merged tensors through "
                            "Ray's object store; no shared storage needed), or auto: workers "
                            "when a probe shows every node sees --out, else driver",
        json_schema_extra=_flag(group="cluster"))
    gpus_per_task: Number = Field(1.0, gt=0, description="GPU share per shard task when GPUs "
                                                        "are used (0.5 packs two per GPU)",
                                  json_schema_extra=_flag("G", group="cluster"))

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, alpha: float | None) -> float | None:
        if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError("must be a finite number > 0")
        return alpha

    @field_validator("gpus_per_task")
    @classmethod
    def _gpu_share(cls, share: float) -> float:
        if not (share <= 1 or float(share).is_integer()) or not math.isfinite(share):
            raise ValueError("must be a fraction in (0, 1] or a whole number")
        return share

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, size: str | int) -> str | int:
        with _as_value_error():
            parse_size(size)
        return size

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        with _as_value_error():
            get_method(name)
        return name

    @model_validator(mode="after")
    def _method_params(self) -> "MergeConfig":
        try:
            get_method(self.method).resolve_params(self.params)
        except InputError as exc:
            raise InputError(f"--param / params: {exc}") from None
        return self

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


@contextlib.contextmanager
def _as_value_error() -> Iterator[None]:
    """Our own checks inside a field validator: pydantic reports ValueErrors with the field's
    name and value, so the user learns which option was wrong."""
    try:
        yield
    except InputError as exc:
        raise ValueError(str(exc)) from None


def parse_size(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").upper() if match else ""
    if isinstance(text, bool) or not match or unit not in _UNITS or float(match.group(1)) <= 0:
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
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the config file ({exc})") from None
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise InputError(f"{path}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# -- the CLI, generated from the model --------------------------------------------------------
def _field_kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    """('bool' | 'list' | 'dict' | 'value', literal choices) of a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if annotation is bool or bool in args:
        return "bool", ()
    if origin is Literal:
        return "value", tuple(typing.get_args(annotation))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for arg in args:
            kind, choices = _field_kind(arg)
            if choices:
                return kind, choices
    if origin is Annotated:
        return _field_kind(args[0])
    if origin is list:
        return "list", ()
    if origin is dict:
        return "dict", ()
    return "value", ()


GROUP_TITLES = {"merge": "merge options", "cluster": "cluster options"}


def flag_of(model: type[BaseModel], name: str) -> str:
    """The command-line flag of a field: its declared one (`--param`, `--no-input-scan`) or
    its name with dashes. Help texts and error messages both use it."""
    facts = cast(dict[str, Any], model.model_fields[name].json_schema_extra or {})
    return facts.get("flag") or "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel] = MergeConfig) -> None:
    """One flag per field of `model`, help text and choices from the field itself.

    Flags carry strings (or True/False for switches) and default to None meaning "not given";
    conversion and checks are the model's, so flags and YAML are validated by the same code.
    """
    facts_of = {name: cast(dict[str, Any], field.json_schema_extra or {})
                for name, field in model.model_fields.items()}
    used = {facts["group"] for facts in facts_of.values()}
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()
              if name in used}
    for name, field in model.model_fields.items():
        facts = facts_of[name]
        group = groups[facts["group"]]
        flag = flag_of(model, name)
        kind, choices = _field_kind(field.annotation)
        help_text = field.description or ""
        if field.is_required():
            help_text += " [required]"
        elif kind == "list" and field.default_factory is not None:
            help_text += f" (default: {' '.join(field.default_factory())})"  # type: ignore[call-arg]
        elif kind not in ("bool", "dict") and field.default is not None:
            help_text += f" (default: {field.default})"
        metavar = facts.get("metavar") or ("{" + ",".join(choices) + "}" if choices else None)
        if kind == "bool":
            action = "store_false" if facts.get("negate") else "store_true"
            group.add_argument(flag, dest=name, action=action, default=None, help=help_text)
        elif kind == "dict":
            group.add_argument(flag, dest=name, action="append", default=None, metavar=metavar,
                               help=help_text)
        elif kind == "list":  # `--finetuned a b --finetuned c` means all three
            group.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_text,
                               nargs="+", action="extend")
        else:
            group.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_text,
                               action=_StoreOnce)


class _StoreOnce(argparse.Action):
    """A single-valued flag given twice (`--out a --out b`) is a mistake to point out, not a
    silent 'the last one wins'."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest, None)
        if previous is not None and previous != values:
            raise argparse.ArgumentError(self, f"given twice ({previous!r} and {values!r})")
        setattr(namespace, self.dest, values)


def load_merge_config(config_path: str | None, flags: Mapping[str, Any]) -> MergeConfig:
    """The YAML file's values, overridden by the flags given (None means 'not given')."""
    file_values = load_yaml(config_path) if config_path else {}
    given = {k: v for k, v in flags.items() if v is not None and k in MergeConfig.model_fields}
    if "params" in given:
        flag_params = parse_params(given.pop("params"))
        file_params = file_values.get("params") or {}
        if isinstance(file_params, dict):
            given["params"] = {**file_params, **flag_params}
    return build_config(MergeConfig, file_values, given, config_path)


def cluster_options(flags: Mapping[str, Any]) -> ClusterOptions:
    """The cluster options among parsed flags, validated like every other option."""
    given = {k: v for k, v in flags.items() if v is not None and k in ClusterOptions.model_fields}
    return build_config(ClusterOptions, {}, given)


Model = TypeVar("Model", bound=BaseModel)


def build_config(model: type[Model], file_values: Mapping[str, Any], flags: Mapping[str, Any],
                 source: str | None = None) -> Model:
    values = {**file_values, **flags}
    try:
        return model(**values)
    except ValidationError as exc:
        raise InputError(_one_line(exc, model, flags, source)) from None


_REASONS = {
    "bool_type": "must be true or false (a YAML boolean, not a string or number)",
    "float_parsing": "must be a number", "float_type": "must be a number",
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "dict_type": "must be a mapping of name: value",
    "list_type": "must be a list of strings", "string_type": "must be a string",
    "missing": "is required",
    "too_short": "needs at least one entry",
}


def _one_line(exc: ValidationError, model: type[BaseModel], flags: Mapping[str, Any],
              source: str | None) -> str:
    """The first validation problem as one line: where, which field, which value, why."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    name = str(error["loc"][0]) if error["loc"] else "config"
    flagged = name in model.model_fields and (name in flags or source is None)
    where = flag_of(model, name) if flagged else f"{source or 'options'}: {name}"
    reason = _REASONS.get(error["type"])
    if reason is None:
        reason = str(error["msg"]).removeprefix("Value error, ").replace("Input should be",
                                                                         "must be")
    if error["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"{where}: unknown option (known: {known})"
    if error["type"] == "missing":
        return f"{where}: {reason}"
    return f"{where} = {error.get('input')!r}: {reason}"
