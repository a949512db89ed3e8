"""Compute curves: fitting loss(C) = a·C^(−b) + c to a handful of (training FLOPs, loss) points, and reading the
iso-loss compute ratio between two fitted curves (how many times the FLOPs one needs to reach the other's loss).

Curves of one study share their floor c (the data's entropy). With four or five budgets per curve the fit has few
degrees of freedom, so its uncertainty is estimated by a jackknife over budgets (refit without each budget in turn),
not from residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """loss(C) = a · (C / scale)^(−b) + c, with c the loss no amount of compute removes (at this model shape and
    data). `scale` keeps a and C near 1 in the arithmetic; it does not change the curve."""

    a: float
    b: float
    c: float
    scale: float

    def loss(self, flops: float | np.ndarray) -> float | np.ndarray:
        return self.a * (np.asarray(flops) / self.scale) ** (-self.b) + self.c

    def flops_at(self, loss: float) -> float:
        """The compute at which the curve reaches `loss` (inf if it never does: at or below the floor c)."""
        if loss <= self.c:
            return math.inf
        return self.scale * (self.a / (loss - self.c)) ** (1 / self.b)

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c, "scale": self.scale}


Curve = tuple[list[float] | np.ndarray, list[float] | np.ndarray]  # (training FLOPs, losses) of one model family


def fit_power_laws(curves: dict[str, Curve], grid: int = 2000) -> dict[str, PowerLaw]:
    """One a and b per curve and one floor c shared by all: the loss no model reaches on this data (its entropy,
    as Chinchilla's E), which a handful of budgets per curve cannot pin down alone: fitted separately, one curve
    puts its floor at 0 and the next at 1.2 from the same kind of points, and their ratios then compare the floors.

    Least squares in loss: for each c on a grid below the smallest loss, log(loss − c) is linear in log C, which
    gives each curve's a and b in closed form (for the whole grid at once); the c whose curves miss their points
    least wins. A grid over the one nonlinear parameter cannot diverge or land in a local minimum, as a Newton fit
    on four points per curve can."""
    arrays = {}
    for name, (flops, losses) in curves.items():
        flops, losses = np.asarray(flops, dtype=np.float64), np.asarray(losses, dtype=np.float64)
        if len(flops) != len(losses) or len(np.unique(flops)) < 3:
            raise ValueError(
                f"a power law with a floor needs points at >= 3 distinct budgets, got "
                f"{len(np.unique(flops))}{f' for {name}' if name else ''}"
            )
        if not (np.all(np.isfinite(losses)) and np.all(flops > 0)):
            raise ValueError("losses must be finite and FLOPs positive")
        arrays[name] = (flops, losses)
    scale = float(np.exp(np.mean([np.log(f).mean() for f, _ in arrays.values()])))
    lowest = min(float(losses.min()) for _, losses in arrays.values())
    floors = lowest * (1 - np.geomspace(1.0, 1e-4, grid))  # from 0 up to just below the lowest loss
    error, valid, lines = np.zeros(grid), np.ones(grid, dtype=bool), {}
    for name, (flops, losses) in arrays.items():  # every floor at once: the least-squares line in closed form
        x = np.log(flops / scale)
        y = np.log(losses[None, :] - floors[:, None])  # [grid, points]
        dx = x - x.mean()
        slope = (y * dx).sum(axis=1) / (dx**2).sum()
        intercept = y.mean(axis=1) - slope * x.mean()
        error += ((np.exp(intercept[:, None] + slope[:, None] * x) + floors[:, None] - losses) ** 2).sum(axis=1)
        valid &= slope < 0  # loss not falling with compute: no power law at this floor
        lines[name] = (slope, intercept)
    if not valid.any():
        raise ValueError("the loss does not fall as compute rises: no power law fits these points")
    best = int(np.flatnonzero(valid)[np.argmin(error[valid])])  # the first of equal minima
    return {
        name: PowerLaw(a=float(np.exp(intercept[best])), b=float(-slope[best]), c=float(floors[best]), scale=scale)
        for name, (slope, intercept) in lines.items()
    }


def fit_power_law(flops: list[float] | np.ndarray, losses: list[float] | np.ndarray) -> PowerLaw:
    """One curve's fit, with a floor of its own."""
    return fit_power_laws({"": (flops, losses)})[""]


def iso_loss_ratio(reference: PowerLaw, other: PowerLaw, target: float) -> float:
    """How many times the FLOPs `reference` needs to reach `target`, compared with `other` (> 1: `other` is
    cheaper)."""
    return reference.flops_at(target) / other.flops_at(target)


def fits_without_each_budget(
    curves: dict[str, tuple[list[float], list[float], list[float]]],
) -> dict[float, dict[str, PowerLaw] | None]:
    """The jackknife's refits: for each budget label, every curve fitted again (jointly) without its points at that
    budget. `curves`: per name, (FLOPs, losses, budget label of each point); several seeds at one budget leave
    together. None where a curve keeps fewer than three budgets or the fit fails."""
    folds: dict[float, dict[str, PowerLaw] | None] = {}
    for left_out in sorted({b for _, _, budgets in curves.values() for b in budgets}):
        kept = {}
        for name, (flops, losses, budgets) in curves.items():
            keep = [i for i, b in enumerate(budgets) if b != left_out]
            kept[name] = ([flops[i] for i in keep], [losses[i] for i in keep])
        try:
            folds[left_out] = fit_power_laws(kept)
        except ValueError:
            folds[left_out] = None
    return folds


def jackknife_error(values: list[float]) -> float:
    """The jackknife standard error sqrt((n−1)/n · Σ(θᵢ − θ̄)²) of leave-one-out estimates θᵢ (NaN below
    two finite ones)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n < 2:
        return math.nan
    mean = sum(finite) / n
    return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in finite))
