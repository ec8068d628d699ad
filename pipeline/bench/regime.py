"""Is a set of fine-tunes in the regime where merging works? The diagnostics the papers' setting
has and a badly made benchmark lacks, measured before anyone looks at which method wins.

- geometry of the task vectors: |tau_t| / |theta_0| (how far fine-tuning moved) and the
  pairwise cosines of tau_t (how much they share);
- weight disentanglement: the accuracy on task i of theta_0 + tau_j, task j's whole vector
  added at alpha 1, relative to zero-shot. Near 1 means task j's fine-tuning left task i alone;
  near chance means any merge must fight interference, and every method looks alike.

Geometry streams one key at a time (float64 sums), so a ViT-L with 20 fine-tunes needs memory
for one key's T + 1 tensors, not for T models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from pipeline.io.reader import open_checkpoint


class TaskRegime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    zero_shot: float
    finetuned: float
    tau_norm_ratio: float          # |tau_t| / |theta_0|
    # mean over j != t of acc_t(theta_0 + tau_j) / zero-shot, and the smallest of those ratios
    # (None where zero-shot accuracy is 0 and the ratio has no meaning)
    cross_relative: float | None
    cross_worst: float | None


class RegimeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    split: str
    order: list[str]               # the tasks in the order the cosine matrix indexes them
    tasks: dict[str, TaskRegime]
    cosine: list[list[float]]      # pairwise cosine of the task vectors, in `order`
    # cross[t][j]: task t's accuracy with task j's whole vector over its zero-shot accuracy
    # (the diagonal: fine-tuned over zero-shot), in `order`
    cross: list[list[float | None]]
    cosine_mean: float             # over pairs j != t
    cosine_max: float
    cross_relative_mean: float | None  # over every (t, j != t)


@dataclass(frozen=True)
class Geometry:
    norm_ratios: list[float]
    cosine: list[list[float]]


def task_vector_geometry(base: str, finetuned: Sequence[str]) -> Geometry:
    """|tau_t| / |theta_0| and cos(tau_s, tau_t) over every floating key the base has."""
    checkpoints = [open_checkpoint(location) for location in (base, *finetuned)]
    try:
        theta0, tuned = checkpoints[0], checkpoints[1:]
        gram = torch.zeros(len(tuned), len(tuned), dtype=torch.float64)
        base_sq = 0.0
        for key in theta0.keys():
            reference = theta0.read(key)
            if not reference.is_floating_point():
                continue
            reference = reference.double().flatten()
            deltas = torch.stack([c.read(key).double().flatten() - reference for c in tuned])
            gram += deltas @ deltas.T
            base_sq += float(reference @ reference)
    finally:
        for c in checkpoints:
            c.close()
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms).clamp_min(torch.finfo(torch.float64).tiny)
    return Geometry([float(n) / math.sqrt(base_sq) for n in norms], cosine.tolist())


def regime_report(tasks: Sequence[str], geometry: Geometry, zero_shot: dict[str, float],
                  finetuned: dict[str, float], cross: dict[tuple[str, str], float],
                  split: str) -> RegimeReport:
    """Assemble the report; `cross[(t, j)]` is task t's accuracy with task j's vector."""
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    relative = [[(finetuned[t] if t == j else cross[(t, j)]) / zero_shot[t]
                 if zero_shot[t] > 0 else None for j in tasks] for t in tasks]
    per_task, ratios = {}, []
    for i, t in enumerate(tasks):
        mine = [r for j, r in enumerate(relative[i]) if j != i and r is not None]
        ratios += mine
        per_task[t] = TaskRegime(zero_shot=zero_shot[t], finetuned=finetuned[t],
                                 tau_norm_ratio=geometry.norm_ratios[i],
                                 cross_relative=mean(mine), cross_worst=min(mine, default=None))
    pairs = [geometry.cosine[i][j] for i in range(len(tasks)) for j in range(len(tasks))
             if i != j]
    return RegimeReport(split=split, order=list(tasks), tasks=per_task, cosine=geometry.cosine,
                        cross=relative,
                        cosine_mean=sum(pairs) / len(pairs) if pairs else 0.0,
                        cosine_max=max(pairs, default=0.0),
                        cross_relative_mean=mean(ratios))


def format_regime(report: RegimeReport) -> str:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"regime on the {report.split} split: task-vector cosine mean "
             f"{report.cosine_mean:.3f}, max {report.cosine_max:.3f}; "
             f"acc(task | theta_0 + another task's tau) / zero-shot: mean "
             f"{ratio(report.cross_relative_mean)}",
             "| task | zero-shot | fine-tuned | abs(tau)/abs(theta_0) | cross / zero-shot "
             "(mean) | (worst) |",
             "|---|---|---|---|---|---|"]
    for name in report.order:
        t = report.tasks[name]
        lines.append(f"| {name} | {100 * t.zero_shot:.1f} | {100 * t.finetuned:.1f} | "
                     f"{100 * t.tau_norm_ratio:.2f}% | {ratio(t.cross_relative)} | "
                     f"{ratio(t.cross_worst)} |")
    return "\n".join(lines)
