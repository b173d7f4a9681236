"""The statistics of a report: mean and spread over seeds, paired differences with a t interval,
and when a curve first reaches a target.

- mean +/- std: the sample mean and the sample standard deviation (n - 1 in the denominator).
- paired difference to the baseline, by seed: d_s = x_s - b_s for every seed s run by both;
  mean d, its sample std s_d, and the 95% interval d +/- t(0.975, n - 1) * s_d / sqrt(n)
  (Student's t with n - 1 degrees of freedom, computed here; no interval for n < 2). The
  interval "excludes zero" when both of its ends lie on the same side of zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    # odd: 2/pi * (theta + sin * cos * [1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)])
    term, total = 1.0, 1.0 if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + sin * math.sqrt(cos2) * total)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer df >= 1, by bisection to 1e-12."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}.")
    central = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < central:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_central(mid, df) < central else (lo, mid)
    return 0.5 * (lo + hi)


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
