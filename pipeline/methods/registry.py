"""The method registry: one name, one function, the few facts the engine needs about it.

Modelled on mergekit's registry: adding a method is writing one function and decorating it. The
function's keyword-only parameters *are* the method's parameters; their defaults and
annotations drive `--param name=value` parsing, so there is no second list to keep in sync.

Kinds, which decide how the engine applies a function to a checkpoint:
- ``matrix``: called on each 2-D, non-excluded key with the stacked task matrices
  ``(T, m, n)``; every other floating key gets the task mean (spec section 0).
- ``elementwise``: called on every floating key with the stacked task vectors ``(T, ...)``.
- ``compress``: returns per-task factors instead of one merged tensor (TSV-C); `reconstruct`
  rebuilds one task's matrix from its factors.

Hooks, which let the engine run any method without knowing its name:
- ``statistics``: model-wide statistics the method needs before any key can be merged (TIES'
  global per-task threshold and majority sign). The engine runs the passes it asks for over
  every shard and hands the result to the function as keyword arguments.
- a function that takes a keyword-only ``key`` receives the merge unit's name (for per-key
  seeding, say).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from pipeline.errors import InputError

Kind = Literal["matrix", "elementwise", "compress"]

SVD_ALPHA_GRID = tuple(round(0.1 * i, 10) for i in range(1, 31))
LINEAR_ALPHA_GRID = tuple(i / 30 for i in range(1, 31))


class StatisticsState(Protocol):
    """Driver-side progress of one model-wide statistic: what to ask every shard next, how to
    fold their answers in, and the final result (JSON-able: it goes into the report)."""

    done: bool
    label: str  # shown on the progress bar

    def request(self) -> Any: ...

    def combine(self, partials: list[Any]) -> None: ...

    def result(self) -> dict[str, Any]: ...


class ModelStatistics(Protocol):
    """A statistic over the whole model, computed shard by shard (see `StatisticsState`)."""

    def start(self, num_tasks: int, num_params: int, dtype: torch.dtype,
              params: Mapping[str, Any]) -> StatisticsState: ...

    def shard_pass(self, deltas: Iterable[torch.Tensor], request: Any) -> Any:
        """Worker side: this shard's partial answer to `request`, from its stacked task
        vectors (T, ...) key by key, in plan order."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    kind: Kind
    # How alpha is chosen: a grid to search, or a fixed rule of T (averaging: 1/T).
    alpha_grid: tuple[float, ...] = ()
    fixed_alpha: Callable[[int], float] | None = None
    # SVDs of an (m, n) key per task count; feeds the planner's cost model.
    svds_per_key: Callable[[int], int] = lambda t: 0
    defaults: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[Mapping[str, Any]], None] = lambda params: None
    statistics: ModelStatistics | None = None
    # compress methods: {factor name: shape} of one (m, n) matrix's factors for T tasks, and
    # one task's matrix rebuilt from its factors.
    factors: Callable[[int, int, int], Mapping[str, tuple[int, ...]]] | None = None
    reconstruct: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None
    wants_key: bool = False

    def uses_matrix_rule(self, key: str, shape: tuple[int, ...], exclude: Iterable[str]
                         ) -> bool:
        """Whether this method's own rule applies to a key: matrix and compress methods treat
        2-D keys not excluded; every other floating key gets the task mean. The one place
        this is decided (planner, workers and math alike)."""
        return self.kind != "elementwise" and len(shape) == 2 and not any(
            pattern in key for pattern in exclude)

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `given`, coerced to the defaults' types and validated."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise InputError(f"method {self.name!r} has no parameter(s) {unknown}; "
                             f"its parameters: {known}")
        params = dict(self.defaults)
        for name, value in given.items():
            params[name] = _coerce(self.name, name, value, type(self.defaults[name]))
        self.validate(params)
        return params

    def alpha_for(self, num_tasks: int, alpha: float | None) -> float:
        """The alpha a single merge uses: the fixed rule, or the caller's choice."""
        if self.fixed_alpha is not None:
            fixed = self.fixed_alpha(num_tasks)
            if alpha is not None and abs(alpha - fixed) > 1e-12:
                raise InputError(f"method {self.name!r} fixes alpha to {fixed:g}; "
                                 f"do not pass --alpha")
            return fixed
        if alpha is None:
            grid = f"{self.alpha_grid[0]:g}..{self.alpha_grid[-1]:g}"
            raise InputError(f"method {self.name!r} needs --alpha: the papers choose it on "
                             f"validation data from {grid} (use `sweep`), or pass the value "
                             f"you want")
        if not 0 < alpha < float("inf"):
            raise InputError(f"alpha must be a finite number > 0, got {alpha}")
        return float(alpha)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, kind: Kind, **facts: Any) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        parameters = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in parameters
                    if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name != "key"}
        wants_key = any(p.name == "key" and p.kind is p.KEYWORD_ONLY for p in parameters)
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, kind=kind, defaults=defaults,
                                     wants_key=wants_key, **facts)
        return fn
    return decorate


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; choose one of: "
                         f"{', '.join(sorted(_REGISTRY))}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def _coerce(method: str, name: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    try:
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if kind is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise InputError(f"method {method!r}: parameter {name}={value!r} is not a {kind.__name__}")
