"""Aggregate statistics for few-run RL comparisons (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical
Precipice"), implemented with numpy/scipy because rliable is not a dependency.

With a handful of seeds the mean is dominated by one lucky or diverged run and the median throws most runs
away; the interquartile mean (IQM) sits between the two. Intervals come from a percentile bootstrap over runs.
rliable's *stratified* bootstrap resamples runs within each task; every comparison here is on one task
(one environment), where it is exactly the ordinary bootstrap over runs implemented below.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import trim_mean

REPS = 2000
CONFIDENCE = 0.95


def iqm(x: ArrayLike, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
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
