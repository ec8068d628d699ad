"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

The trim threshold is global: the kk-th smallest |x| of each task vector over the *whole* model.
With the model sharded by layer no worker sees the whole vector, so the threshold is found by an
exact radix select over the magnitudes' bit patterns (non-negative IEEE floats sort like their
bits): each pass, every shard histograms the next 16 bits of the values that still match the
prefix found so far, and the driver walks the summed histogram to the kk-th value. Two passes for
float32, four for float64, a few kilobytes each; the result is exactly `kthvalue`'s. The
"majority sign" that replaces zero elected signs is also global and needs its own pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.methods.registry import LINEAR_ALPHA_GRID, register

MERGE_FUNCS = ("mean", "sum", "max")
DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS


def _validate(params: Mapping) -> None:
    if not 0 < params["k"] <= 100:
        raise InputError(f"ties: k is the percent of entries kept and must be in (0, 100], "
                         f"got {params['k']}")
    if params["merge_func"] not in MERGE_FUNCS:
        raise InputError(f"ties: merge_func must be one of {MERGE_FUNCS}, "
                         f"got {params['merge_func']!r}")


class TiesStatistics:
    """TIES' model-wide statistics as a method hook: the exact per-task thresholds (a radix
    select, one pass per 16-bit digit), then the majority sign (one more pass)."""

    def start(self, num_tasks: int, num_params: int, dtype: torch.dtype,
              params: Mapping[str, Any]) -> "_TiesState":
        return _TiesState(RadixSelect(num_tasks, kept_rank(num_params, params["k"]), dtype))

    def shard_pass(self, deltas: Iterable[torch.Tensor], request: tuple) -> Any:
        if request[0] == "sign":
            thresholds = None
            total = 0
            for d in deltas:
                if thresholds is None:
                    thresholds = torch.tensor(request[1], dtype=d.dtype, device=d.device)
                total += sign_total(d, thresholds)
            return total
        _, level, prefixes = request
        totals: dict[int, np.ndarray] = {}
        for d in deltas:
            for t, (digits, counts) in enumerate(digit_histograms(d.cpu(), level, prefixes)):
                np.add.at(totals.setdefault(t, np.zeros(DIGITS, np.int64)), digits, counts)
        out = []
        for t in range(len(prefixes)):
            dense = totals.get(t, np.zeros(DIGITS, np.int64))
            nonzero = np.flatnonzero(dense)
            out.append((nonzero.astype(np.int32), dense[nonzero]))
        return out


class _TiesState:
    def __init__(self, select: "RadixSelect"):
        self.select = select
        self.thresholds: list[float] | None = None
        self.majority_sign: int | None = None
        self._advance_phase()

    def _advance_phase(self) -> None:
        if self.select.done and self.thresholds is None:
            self.thresholds = self.select.thresholds().tolist()
        self.done = self.majority_sign is not None
        self.label = (f"ties threshold {self.select.level + 1}/{self.select.levels}"
                      if self.thresholds is None else "ties majority sign")

    def request(self) -> tuple:
        if self.thresholds is None:
            return ("histogram", self.select.level, list(self.select.prefixes))
        return ("sign", self.thresholds)

    def combine(self, partials: list[Any]) -> None:
        if self.thresholds is None:
            for histograms in partials:
                self.select.add(histograms)
            self.select.advance()
        else:
            self.majority_sign = int(np.sign(sum(partials)))
        self._advance_phase()

    def result(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "majority_sign": self.majority_sign}


@register("ties", "elementwise", alpha_grid=LINEAR_ALPHA_GRID, validate=_validate,
          statistics=TiesStatistics())
def ties(deltas: torch.Tensor, *, thresholds: Sequence[float] | torch.Tensor,
         majority_sign: int, k: float = 20.0, merge_func: str = "mean") -> torch.Tensor:
    """Apply the trim / elect / disjoint-merge steps to one key, given the global statistics."""
    thresholds = torch.as_tensor(thresholds, dtype=deltas.dtype, device=deltas.device)
    trimmed = trim(deltas, thresholds)
    signs = elected_signs(trimmed)
    signs[signs == 0] = majority_sign
    keep = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    if merge_func == "mean":
        count = (selected != 0).sum(dim=0).to(deltas.dtype)
        return selected.sum(dim=0) / count.clamp(min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    return selected.abs().amax(dim=0) * signs


def trim(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep entries with |x| >= the task's threshold (`thresholds` has one value per task)."""
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    return deltas * (deltas.abs() >= thresholds.to(deltas.dtype).view(shape))


def elected_signs(trimmed: torch.Tensor) -> torch.Tensor:
    return torch.sign(trimmed.sum(dim=0))


def kept_rank(num_params: int, k: float) -> int:
    """1-based rank of the threshold among |x|, in the official code's arithmetic
    (`K = k / 100; kk = N - int(N * K)`); 0 means k = 100, keep everything."""
    return num_params - int(num_params * (k / 100))


def sign_total(deltas: torch.Tensor, thresholds: torch.Tensor) -> int:
    """This key's contribution to sum(g), whose sign fills the zero elected signs."""
    return int(elected_signs(trim(deltas, thresholds)).sum().item())


# -- exact distributed k-th value ------------------------------------------------------------
def magnitude_bits(deltas: torch.Tensor) -> torch.Tensor:
    """Bit patterns of |x| as integers, flattened per task; they sort exactly like |x|."""
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64}[deltas.dtype]
    return deltas.abs().reshape(deltas.shape[0], -1).view(int_type)


def digit_histograms(deltas: torch.Tensor, level: int, prefixes: Iterable[int]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task, a sparse histogram (digits, counts) of the `level`-th 16-bit digit of |x|,
    over the entries whose higher digits equal that task's prefix."""
    bits = magnitude_bits(deltas)
    width = bits.element_size() * 8
    shift = width - DIGIT_BITS * (level + 1)
    out = []
    for t, prefix in enumerate(prefixes):
        row = bits[t]
        if level:
            row = row[(row >> (shift + DIGIT_BITS)) == prefix]
        counts = torch.bincount(((row >> shift) & (DIGITS - 1)).long(), minlength=DIGITS)
        nonzero = torch.nonzero(counts).flatten()
        out.append((nonzero.numpy().astype(np.int32), counts[nonzero].numpy()))
    return out


class RadixSelect:
    """Driver-side state of the exact k-th smallest |x| search, one rank per task."""

    def __init__(self, num_tasks: int, rank: int, dtype: torch.dtype):
        self.width = torch.empty((), dtype=dtype).element_size() * 8
        self.dtype = dtype
        self.levels = self.width // DIGIT_BITS
        self.level = 0
        self.ranks = [rank] * num_tasks
        self.prefixes = [0] * num_tasks
        self._counts = np.zeros((num_tasks, DIGITS), dtype=np.int64)
        self.done = rank == 0

    def add(self, histograms: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for t, (digits, counts) in enumerate(histograms):
            np.add.at(self._counts[t], digits, counts)

    def advance(self) -> None:
        """Fix one more digit of every task's threshold from the histograms added so far."""
        for t in range(len(self.ranks)):
            cumulative = np.cumsum(self._counts[t])
            digit = int(np.searchsorted(cumulative, self.ranks[t]))  # first bin reaching rank
            if digit >= DIGITS:
                raise RuntimeError("radix select lost track of the rank: shard statistics "
                                   "do not add up to the parameter count")
            below = int(cumulative[digit - 1]) if digit else 0
            self.ranks[t] -= below
            self.prefixes[t] = (self.prefixes[t] << DIGIT_BITS) | digit
        self._counts[:] = 0
        self.level += 1
        self.done = self.level == self.levels

    def thresholds(self) -> torch.Tensor:
        if self.level == 0:  # rank 0: k = 100 keeps every entry
            return torch.zeros(len(self.ranks), dtype=self.dtype)
        int_type = {32: torch.int32, 64: torch.int64}[self.width]
        return torch.tensor(self.prefixes, dtype=int_type).view(self.dtype)


def reference_thresholds(task_vectors: Mapping[str, torch.Tensor], k: float) -> torch.Tensor:
    """Single-process thresholds, exactly as the official code: `kthvalue` over the whole
    flattened model (keys sorted by name). Holds everything in memory: for tests and small
    models; the engine uses `RadixSelect`."""
    flat = torch.cat([task_vectors[key].reshape(task_vectors[key].shape[0], -1)
                      for key in sorted(task_vectors)], dim=1)
    rank = kept_rank(flat.shape[1], k)
    if rank == 0:
        return torch.zeros(flat.shape[0], dtype=flat.dtype)
    return flat.abs().kthvalue(rank, dim=1).values


def reference_ties(task_vectors: Mapping[str, torch.Tensor], k: float = 20.0,
                   merge_func: str = "mean") -> dict[str, torch.Tensor]:
    """Whole-model TIES in one process: the ground truth the sharded engine must equal."""
    thresholds = reference_thresholds(task_vectors, k)
    majority = sum(sign_total(tv, thresholds) for tv in task_vectors.values())
    majority_sign = int(np.sign(majority))
    return {key: ties(tv, thresholds=thresholds, majority_sign=majority_sign, k=k,
                      merge_func=merge_func) for key, tv in task_vectors.items()}
