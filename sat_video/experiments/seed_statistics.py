"""Mean, spread and significance of a metric over the training seeds of an ablation variant.

A variant's mean over ``n`` seeds has the standard error ``sqrt(max(s^2, f^2) / n)``: ``s`` is the standard
deviation over the seeds (the spread), and ``f`` is the error one run carries by itself, which keeps a few
seeds that happen to agree from looking exact. For an accuracy over ``k`` prompts ``f`` is the binomial
``sqrt(p (1 - p) / k)``, with ``p`` pulled towards 1/2 as Agresti and Coull do, so that it is never 0.
A difference between two variants is significant when it exceeds twice its standard error, about a 95 %
two-sided test; with 3 seeds each, that is about 1.6 times the spread. One seed gives no spread, so no
difference is called significant.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t, 97.5th percentile, for 1 to 30 degrees of freedom; beyond, the normal's 1.96."""


@dataclass(frozen=True)
class Estimate:
    """A metric's values over seeds (one per seed, ``None`` for runs that did not produce it dropped)."""

    values: tuple[float, ...]
    run_error: float = 0.0
    """``f`` above: the error of one run's value by itself."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def spread(self) -> float:
        """Standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def standard_error(self) -> float:
        return math.sqrt(max(self.spread, self.run_error) ** 2 / self.n) if self.n else math.nan

    def format(self, digits: int = 3) -> str:
        if not self.values:
            return "-"
        return f"{self.mean:.{digits}g}" + (f" ± {self.spread:.{digits - 1}g}" if self.n > 1 else "")


def accuracy_estimate(shares: Sequence[float], prompts: int) -> Estimate:
    """An accuracy measured on ``prompts`` prompts per seed (``shares`` in [0, 1])."""
    hits, trials = sum(shares) * prompts, len(shares) * prompts
    p = (hits + 2) / (trials + 4)
    return Estimate(tuple(shares), math.sqrt(p * (1 - p) / prompts))


def critical_t(degrees_of_freedom: int) -> float:
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else 1.96


def significant(a: Estimate, b: Estimate) -> bool:
    """Whether ``a`` and ``b`` differ by more than the t-scaled standard error of their difference (see the module)."""
    if a.n < 2 or b.n < 2:
        return False
    return abs(a.mean - b.mean) > critical_t(a.n + b.n - 2) * math.hypot(a.standard_error, b.standard_error)
