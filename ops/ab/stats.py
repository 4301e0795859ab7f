"""Paired differences with a 95% confidence interval: Student's t (the default) or a percentile
bootstrap. Pure: numbers in, numbers out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

CiMethod = Literal["t", "bootstrap"]
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class Interval:
    """The mean of the paired differences (optimised - raw) and its confidence interval.
    `low`/`high` are None below two pairs (no spread to estimate)."""

    n: int
    mean: float
    low: float | None
    high: float | None
    method: CiMethod
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def _diffs(raw: Sequence[float], optimised: Sequence[float]) -> np.ndarray:
    if len(raw) != len(optimised):
        raise ValueError(f"paired samples differ in length: {len(raw)} and {len(optimised)}")
    if not raw:
        raise ValueError("no pairs")
    return np.asarray(optimised, dtype=np.float64) - np.asarray(raw, dtype=np.float64)


def paired_t(raw: Sequence[float], optimised: Sequence[float], level: float = 0.95) -> Interval:
    """mean(d) ± t_{(1+level)/2, n-1} · sd(d)/√n, d = optimised - raw."""
    d = _diffs(raw, optimised)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return Interval(n, mean, None, None, "t", level)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, "t", level)


def paired_bootstrap(raw: Sequence[float], optimised: Sequence[float], level: float = 0.95, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap of mean(d): the pairs are resampled with replacement."""
    d = _diffs(raw, optimised)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return Interval(n, mean, None, None, "bootstrap", level)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(n, mean, float(low), float(high), "bootstrap", level)


def paired_interval(raw: Sequence[float], optimised: Sequence[float], method: CiMethod = "t",
                    level: float = 0.95, *, seed: int = 0) -> Interval:
    if method == "t":
        return paired_t(raw, optimised, level)
    return paired_bootstrap(raw, optimised, level, seed=seed)
