"""The statistics of a report: mean and spread over seeds, paired differences with a t interval,
and when a curve first reaches a target.

- mean +/- std: the sample mean and the sample standard deviation (n - 1 in the denominator).
- paired difference to the baseline, by seed: d_s = x_s - b_s for every seed s run by both;
  mean d, its sample std s_d, and the 95% interval d +/- t(0.975, n - 1) * s_d / sqrt(n)
  (Student's t with n - 1 degrees of freedom, from scipy.stats; no interval for n < 2). The
  interval "excludes zero" when both of its ends lie on the same side of zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # NaN for n < 2


@dataclass
class PairedDiff:
    n: int  # seeds paired
    mean: float
    std: float
    lo: float  # NaN for n < 2
    hi: float
    seeds: tuple[int, ...]

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def summarize(values: Sequence[float]) -> Summary | None:
    """Mean and sample std of the finite values; None if there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    return Summary(len(vals), float(np.mean(vals)), std)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (scipy.stats)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}.")
    return float(student_t.ppf(p, df))


def paired_diff(
    run: dict[int, float], base: dict[int, float], level: float = 0.95
) -> PairedDiff | None:
    """Difference run - baseline paired by seed (dicts seed -> value); None if no seed is shared."""
    seeds = tuple(
        sorted(s for s in run if s in base and run[s] is not None and base[s] is not None)
    )
    diffs = [run[s] - base[s] for s in seeds]
    if not diffs:
        return None
    n, mean = len(diffs), float(np.mean(diffs))
    if n < 2:
        return PairedDiff(n, mean, float("nan"), float("nan"), float("nan"), seeds)
    std = float(np.std(diffs, ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return PairedDiff(n, mean, std, mean - half, mean + half, seeds)


def first_reach(xs: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first x at which the value is at least target; None if never."""
    for x, v in zip(xs, values):
        if v >= target:
            return float(x)
    return None


def value_at(xs: Sequence[float], values: Sequence[float], at: float) -> float | None:
    """Linear interpolation of a logged series at x = at (clamped to its ends); None if empty."""
    if not len(xs):
        return None
    return float(np.interp(at, xs, values))


def mean_of(values: Sequence[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else None
