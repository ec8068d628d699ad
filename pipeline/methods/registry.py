"""The method registry: one name, one function, the few facts the engine needs about it.

Modelled on mergekit's registry: adding a method is writing one function and decorating it. The
function's keyword-only parameters *are* the method's parameters; their defaults and
annotations drive `--param name=value` parsing, so there is no second list to keep in sync.

Kinds, which decide how the engine applies a function to a checkpoint:
- ``matrix``: called on each 2-D, non-excluded key with the stacked task matrices
  ``(T, m, n)``; every other floating key gets the task mean (spec section 0).
- ``elementwise``: called on every floating key with the stacked task vectors ``(T, ...)``.
- ``global``: like elementwise, but needs model-wide statistics first (TIES' per-task
  threshold); the engine computes them in a first pass and passes them as keyword arguments.
- ``compress``: returns per-task factors instead of one merged tensor (TSV-C).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from ..errors import InputError

Kind = Literal["matrix", "elementwise", "global", "compress"]

SVD_ALPHA_GRID = tuple(round(0.1 * i, 10) for i in range(1, 31))
LINEAR_ALPHA_GRID = tuple(i / 30 for i in range(1, 31))


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
            raise InputError(f"method {self.name!r} needs --alpha: the papers choose it on "
                             f"validation data from {self.alpha_grid[0]:g}..{self.alpha_grid[-1]:g} "
                             f"(use `sweep`), or pass the value you want")
        if not 0 < alpha < float("inf"):
            raise InputError(f"alpha must be a finite number > 0, got {alpha}")
        return float(alpha)


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, kind: Kind, **facts: Any) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                    if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, kind=kind, defaults=defaults, **facts)
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
