"""Statistics for few-run RL comparisons: aggregates after Agarwal et al. 2021 ("Deep RL at the Edge of the
Statistical Precipice"; numpy/scipy, rliable is not a dependency), and the effect of each group against a baseline
with t intervals, Holm / Bonferroni adjustment and power (scipy.stats, statsmodels).

With a handful of seeds the mean is dominated by one lucky or diverged run and the median throws most runs
away; the interquartile mean (IQM) sits between the two. Intervals come from a percentile bootstrap over runs.
rliable's *stratified* bootstrap resamples runs within each task; every comparison here is on one task
(one environment), where it is exactly the ordinary bootstrap over runs implemented below.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.stats import trim_mean
from statsmodels.stats.power import TTestIndPower

REPS = 2000
CONFIDENCE = 0.95


def iqm(x: ArrayLike, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def _percentiles(samples: ArrayLike, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(samples, dtype=float), [tail, 100.0 - tail])
    return float(lo), float(hi)


def _at_least_two(*arrays: np.ndarray) -> None:
    # A bootstrap over one run only ever resamples that run: the "interval" would be a point, not a result.
    if min(len(a) for a in arrays) < 2:
        raise ValueError("a bootstrap interval needs at least 2 runs per group")


def iqm_ci(x: ArrayLike, reps: int = REPS, confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the IQM, resampling runs with replacement."""
    x = np.asarray(x, dtype=float)
    _at_least_two(x)
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, len(x), size=(reps, len(x)))]
    return _percentiles(iqm(samples, axis=1), confidence)


def _poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y) over all pairs of the last axis (leading axes are bootstrap replicates)."""
    gt = x[..., :, None] > y[..., None, :]
    eq = x[..., :, None] == y[..., None, :]
    return (gt + 0.5 * eq).mean(axis=(-2, -1))


def _paired_poi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of seeds where X beats Y (ties count half); x[i] and y[i] come from the same seed."""
    return ((x > y) + 0.5 * (x == y)).mean(axis=-1)


def probability_of_improvement(x: ArrayLike, y: ArrayLike, paired: bool = False) -> float:
    """P(a run of X scores higher than a run of Y), ties counting half (the Mann-Whitney U statistic / (n m)).

    ``paired``: x[i] and y[i] share a seed, so only same-seed pairs are compared; this removes the part of the
    run-to-run variation that the seed explains (same initial weights, same environment seeds).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if paired:
        if x.shape != y.shape:
            raise ValueError("paired comparison needs one value of each group per seed")
        return float(_paired_poi(x, y))
    return float(_poi(x, y))


def probability_of_improvement_ci(x: ArrayLike, y: ArrayLike, paired: bool = False, reps: int = REPS,
                                  confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of :func:`probability_of_improvement`: seed pairs are resampled together when
    ``paired``; otherwise each group's runs are resampled independently (stratified by group, as rliable does)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _at_least_two(x, y)
    rng = np.random.default_rng(seed)
    if paired:
        if x.shape != y.shape:
            raise ValueError("paired comparison needs one value of each group per seed")
        idx = rng.integers(0, len(x), size=(reps, len(x)))
        return _percentiles(_paired_poi(x[idx], y[idx]), confidence)
    xs = x[rng.integers(0, len(x), size=(reps, len(x)))]
    ys = y[rng.integers(0, len(y), size=(reps, len(y)))]
    return _percentiles(_poi(xs, ys), confidence)


# --------------------------------------------------------------------------------- effects, multiplicity, power
# The comparisons with a baseline are judged on means with t intervals: their coverage is right at small n when
# the per-run metric is roughly normal (a mean over evaluations is), where a bootstrap over 3 runs is not (its
# "95%" interval of 3 values is their range, about 75% coverage).


def mean_ci(x: ArrayLike, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``x`` (n >= 2)."""
    x = np.asarray(x, dtype=float)
    _at_least_two(x)
    if np.ptp(x) == 0:  # no spread, no width (scipy would return NaN for a zero scale)
        return float(x[0]), float(x[0])
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(lo), float(hi)


def pairs_correlate(x: ArrayLike, y: ArrayLike, alpha: float = 0.05) -> bool:
    """Whether same-seed values of two groups are shown to correlate positively (Pearson, one-sided test at
    ``alpha``): only then does pairing by seed remove variance rather than spend degrees of freedom."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return False
    return bool(stats.pearsonr(x, y, alternative="greater").pvalue < alpha)


@dataclass
class Difference:
    """mean(x) - mean(y) with its two-sided interval and p-value (Welch's t, or the paired t)."""
    diff: float
    low: float
    high: float
    p: float
    paired: bool


def difference(x: ArrayLike, y: ArrayLike, confidence: float = CONFIDENCE, paired: bool = False) -> Difference:
    """The difference of means of ``x`` and ``y`` (each n >= 2): Welch's unequal-variance t interval, or the
    paired t interval when ``paired`` (x[i], y[i] from one seed)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _at_least_two(x, y)
    if paired:
        if x.shape != y.shape:
            raise ValueError("paired comparison needs one value of each group per seed")
        res = stats.ttest_rel(x, y)
    else:
        res = stats.ttest_ind(x, y, equal_var=False)
    ci = res.confidence_interval(confidence_level=confidence)
    p = float(res.pvalue) if np.isfinite(res.pvalue) else 1.0  # two identical constant groups: no evidence
    diff = float(np.mean(x - y)) if paired else float(x.mean() - y.mean())
    low, high = (float(ci.low), float(ci.high)) if np.isfinite(ci.low) else (diff, diff)
    return Difference(diff, low, high, p, paired)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of tests, in the given order: the i-th smallest p times
    (k - i + 1), made monotone, capped at 1. statsmodels' ``multipletests(method="holm")`` gives the same
    (tests/test_plan.py checks it) but runs a full garbage collection per call, 0.2 s here."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    stepped = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return [float(x) for x in adjusted]


def pooled_sd(groups: Sequence[ArrayLike]) -> float:
    """The within-group standard deviation pooled over ``groups`` (those with >= 2 values), weighted by their
    degrees of freedom; NaN when no group has two values."""
    ss, df = 0.0, 0
    for g in groups:
        g = np.asarray(g, dtype=float)
        if len(g) >= 2:
            ss += float(np.var(g, ddof=1)) * (len(g) - 1)
            df += len(g) - 1
    return float(np.sqrt(ss / df)) if df else float("nan")


def detectable_difference(n: int, sd: float, alpha: float, power: float) -> float:
    """The smallest difference of means a two-sided two-sample t-test at ``alpha`` detects with ``power``, with
    ``n`` runs per group and within-group SD ``sd`` (statsmodels' TTestIndPower); NaN for n < 2."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    with warnings.catch_warnings():  # a root finder that gives up says so by NaN, handled by the callers
        warnings.simplefilter("ignore")
        d = TTestIndPower().solve_power(effect_size=None, nobs1=n, alpha=alpha, power=power, ratio=1.0)
    return float(d) * sd


def runs_needed(difference_: float, sd: float, alpha: float, power: float) -> int:
    """Runs per group for a two-sided two-sample t-test at ``alpha`` to detect ``difference_`` with ``power``
    (at least 2); -1 when the SD is unknown."""
    if not np.isfinite(sd) or not np.isfinite(difference_) or difference_ <= 0:
        return -1
    analysis = TTestIndPower()
    d = difference_ / sd if sd > 0 else np.inf
    at_two = analysis.power(effect_size=d, nobs1=2, alpha=alpha, ratio=1.0) if np.isfinite(d) else 1.0
    # the root finder has nothing to find below the smallest sample; for effects of tens of SDs statsmodels'
    # noncentral t returns NaN where the power is 1
    if at_two >= power or (not np.isfinite(at_two) and d > 10):
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = float(analysis.solve_power(effect_size=d, nobs1=None, alpha=alpha, power=power, ratio=1.0))
    if not np.isfinite(n):
        # statsmodels' root finder gives up on very small effects (thousands of runs): the normal approximation,
        # which the t-test approaches at such sizes, is then exact enough
        z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
        n = 2 * (z / d) ** 2 + 1
    return max(2, int(np.ceil(n)))
