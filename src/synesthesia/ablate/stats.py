"""Confidence intervals for ablation results: over seeds, paired by seed, and over a test set.

Three pure functions, no I/O:

- :func:`mean_interval`: the Student t interval of a mean over seeds,
  ``mean ± t_{(1+c)/2, n−1} · s / √n`` with ``s`` the sample standard deviation.
- :func:`paired_difference`: the same interval on the per-seed differences
  ``a[seed] − b[seed]`` over the seeds both have. Cells of one grid share seeds
  (same initialisation and data order), so the pairing removes the seed-to-seed
  variation the two methods have in common; the verdict says which one is better
  only when the interval excludes 0.
- :func:`wilson_interval`: the Wilson score interval of one run's accuracy on a
  test set of ``n`` samples (its binomial uncertainty, whatever the seed),
  ``(p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)``.

A mean over fewer than two values has no t interval: its bounds are NaN, and a
paired difference over fewer than two shared seeds is "not distinguishable".
NaN values (a cell whose evaluation failed) are left out and not counted in n.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

A_BETTER = "A better"
B_BETTER = "B better"
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; ``low``/``high`` are NaN when there is none."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the interval (True when there is no interval: nothing excludes it)."""
        return not self.has_interval or self.low <= value <= self.high


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a − b`` over the shared seeds, its interval, and what it allows one to say."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    verdict: str  # A_BETTER, B_BETTER or NOT_DISTINGUISHABLE

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def distinguishable(self) -> bool:
        return self.verdict != NOT_DISTINGUISHABLE


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    if dof < 1:
        raise ValueError(f"Student t needs at least 1 degree of freedom, got {dof}")
    return float(t.ppf(probability, dof))


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) with its Student t interval (n − 1 degrees of freedom).

    With one value the bounds are NaN (one seed says nothing about seed-to-seed
    variation); with none the estimate is NaN too.
    """
    _check_confidence(confidence)
    values = _finite(values)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, confidence)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], confidence: float = 0.95
) -> PairedDifference:
    """``a − b`` paired by seed: ``a`` and ``b`` map seed → accuracy of two methods.

    Only the seeds both have (with a finite value in each) count. The verdict is
    ``"A better"`` when the whole interval is above 0, ``"B better"`` when it is
    below 0, and ``"not distinguishable"`` when it contains 0 or there are fewer
    than two shared seeds (no interval).
    """
    _check_confidence(confidence)
    interval = mean_interval([a[seed] - b[seed] for seed in a if seed in b], confidence)
    if not interval.has_interval or interval.contains(0.0):
        verdict = NOT_DISTINGUISHABLE
    elif interval.low > 0:
        verdict = A_BETTER
    else:
        verdict = B_BETTER
    return PairedDifference(interval.estimate, interval.low, interval.high, interval.n, confidence, verdict)


def wilson_interval(correct_fraction: float, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of an accuracy ``correct_fraction`` measured on ``n`` test samples."""
    _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"a Wilson interval needs at least one test sample, got n={n}")
    p = float(correct_fraction)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"correct_fraction must be in [0, 1], got {correct_fraction}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, confidence)


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals, for the tables; – for none or NaN."""
    return "–" if x is None or math.isnan(x) else f"{100 * x:.2f}"
