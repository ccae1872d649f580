"""Verdicts from evidence, one rule each, shared by ``av-td3 validate`` and ``av-td3 compare``.

* **diverged**: numerical failure, or Q values no return of the run supports: the NaN guard stopped the run, a
  logged quantity went non-finite, |Q| (or |actor loss|) passed the reward bound ``max|r| / (1 - gamma) *
  monitor.q_margin`` (:func:`av_td3.bounds.q_bound`), or it passed ``monitor.q_return_factor`` times the largest
  |return| of any episode the run played (training or evaluation): a Q value estimates a discounted return, so
  one far above every return the run ever collected is over-estimation run away. A large gradient norm is not
  divergence: clipping exists for it.
* **collapsed** is a learning outcome, reported apart: the run's final level lost more than
  ``monitor.collapse_fraction`` of what its best level had gained over its first evaluation (the untrained
  policy's). A level is the mean of ``monitor.collapse_window`` consecutive evaluations (final: the last ones;
  best: the best such run of them), so one noisy evaluation of a few episodes neither makes nor hides a
  collapse; a window of 1 compares single evaluations.
* **failed to learn**: the run's best level never rose more than ``monitor.learn_min_gain`` above what the
  untrained agent scores: the mean return of the training episodes played with random actions before
  ``trainer.learning_starts`` (the first evaluation when none was logged). Not the first evaluation itself: it
  comes after thousands of updates, and a run that is already good then would read "failed" (rules v3 did that).
* **gradient spikes** are counted by the monitor against each net's own norm history (``grad/<net>/spikes``,
  see :class:`av_td3.agent.monitor.SpikeDetector`) and reported per 1,000 updates.

Each verdict carries the rule that fired and the step, so a report can say why. The rules carry a version
(:data:`RULES`): a plan names the version it was written for, and a report names the one it used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from av_td3 import rundir, tags
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.bounds import q_bound
from av_td3.tags import NETS

# The versions of the verdict rules: a rule changed during a study must be visible in its report.
RULES: dict[int, str] = {
    1: "collapse judged on single evaluations (window 1); better/worse when P(improvement)'s bootstrap interval "
       "excludes 0.5 with >= 3 runs per group",
    2: "collapse judged on levels of monitor.collapse_window = 2 evaluations (changed on 2026-12-02 during the clip "
       "study, after one of its runs, arm=td3 seed 11, tripped rule v1)",
    3: "v2's collapse rule; diverged also when |Q| passes monitor.q_return_factor x the largest |return| the run "
       "played; failed to learn; better/worse only when the family-adjusted interval of the effect on the primary "
       "metric excludes 0 with >= 5 runs per group, equivalent when it lies within the plan's margin (2026-12-06)",
    4: "v3, with failed to learn judged against the random-action warm-up episodes' mean return instead of the "
       "first evaluation (changed 2026-12-07 after a stress pilot that learned by its first evaluation read "
       "'failed' under v3)",
    5: "v4, with a run the NaN guard stopped kept in the return metrics (late, AUC, final): each evaluation it did "
       "not reach scores its random-action warm-up mean return, instead of the run being left out of its group's "
       "mean (2026-12-07, declared before the when-map's runs; no archived study or control run was stopped)",
}
RULES_VERSION = 5
# |actor loss| = |mean Q of the policy's actions|, so it is held to the same bound as the critics' Q values.
Q_TAGS = ("train/q1", "train/q2", "train/q_abs_max", "train/actor_loss", "train/actor_loss_max")
RETURN_TAGS = ("episode/return", "eval/return")


@dataclass
class Verdict:
    diverged: str | None = None         # the rule that fired and where; None: not diverged
    diverged_step: int | None = None
    collapsed: str | None = None        # the rule with its numbers; None: not collapsed (or too few evaluations)
    collapsed_step: int | None = None
    failed: str | None = None           # failed to learn: the rule with its numbers; None: learned (or too few)
    spikes: dict[str, tuple[int, int]] = field(default_factory=dict)  # net -> (spikes, updates), when logged
    q_abs_max: float = float("nan")     # largest |Q-like| value logged, for tables

    def spike_rate(self, net: str) -> float:
        """Spikes per 1,000 updates of ``net`` (NaN when not logged or no updates)."""
        spikes, updates = self.spikes.get(net, (0, 0))
        return 1000.0 * spikes / updates if updates else float("nan")


def nan_guard_stop(run: Run) -> dict[str, Any] | None:
    """The NaN guard's record in the run's summary.json (``quantity``, ``step``) when it stopped the run; None
    when it did not (:func:`av_td3.rundir.nan_guard_stop`, the one reader of that record)."""
    return rundir.nan_guard_stop(run.summary)


def _nan_guard(run: Run) -> tuple[str, int | None] | None:
    guard = nan_guard_stop(run)
    if guard is None:
        return None
    return f"NaN guard: non-finite {guard.get('quantity')} at step {guard.get('step')}", guard.get("step")


def _non_finite(df: pd.DataFrame) -> tuple[str, int] | None:
    bad = df[~np.isfinite(df["value"].to_numpy())]
    if bad.empty:
        return None
    first = bad.loc[bad["step"].idxmin()]
    return f"non-finite {first['tag']} at step {int(first['step'])}", int(first["step"])


def _q_beyond_bound(df: pd.DataFrame, run: Run, verdict: Verdict) -> tuple[str, int] | None:
    q = df[df["tag"].isin(Q_TAGS) & np.isfinite(df["value"].to_numpy())]
    if q.empty or run.config is None:
        return None
    verdict.q_abs_max = float(q["value"].abs().max())
    bound = q_bound(run.config)
    over = q[q["value"].abs() > bound]
    if over.empty:
        return None
    first = over.loc[over["step"].idxmin()]
    return (f"|{first['tag']}| = {abs(first['value']):.4g} at step {int(first['step'])} beyond the reward bound "
            f"max|r| / (1 - gamma) x q_margin = {bound:.4g}", int(first["step"]))


def _q_beyond_returns(df: pd.DataFrame, run: Run) -> tuple[str, int] | None:
    q = df[df["tag"].isin(Q_TAGS) & np.isfinite(df["value"].to_numpy())]
    returns = df[df["tag"].isin(RETURN_TAGS) & np.isfinite(df["value"].to_numpy())]
    if q.empty or returns.empty or run.config is None:
        return None
    factor = float(run.config.monitor.q_return_factor)
    played = float(returns["value"].abs().max())
    over = q[q["value"].abs() > factor * played]
    if over.empty:
        return None
    first = over.loc[over["step"].idxmin()]
    return (f"|{first['tag']}| = {abs(first['value']):.4g} at step {int(first['step'])}, more than "
            f"monitor.q_return_factor = {factor:g} x the largest |return| the run played ({played:.4g})",
            int(first["step"]))


def _levels(returns: pd.Series, window: int) -> pd.Series:
    """Mean of ``window`` consecutive evaluations after the first, indexed by each window's last step."""
    return returns.iloc[1:].rolling(window).mean().dropna()


def untrained_level(df: pd.DataFrame, run: Run) -> tuple[float, str] | None:
    """What the untrained agent scores, and where that figure comes from: the mean return of the training episodes
    that ended by ``trainer.learning_starts`` (random actions), else the first evaluation."""
    assert run.config is not None
    episodes = series(df, "episode/return").dropna()
    warmup = episodes[episodes.index <= int(run.config.trainer.learning_starts)]
    if len(warmup):
        return float(warmup.mean()), f"the mean return of its {len(warmup)} random-action warm-up episode(s)"
    returns = series(df, "eval/return").dropna().sort_index()
    if returns.empty:
        return None
    return float(returns.iloc[0]), f"its first evaluation (step {int(returns.index[0])})"


def _failed_to_learn(df: pd.DataFrame, run: Run) -> str | None:
    returns = series(df, "eval/return").dropna().sort_index()
    if run.config is None:
        return None
    window = int(run.config.monitor.collapse_window)
    need = float(run.config.monitor.learn_min_gain)
    levels = _levels(returns, window)
    reference = untrained_level(df, run)
    if levels.empty or reference is None:
        return None
    (untrained, what), best = reference, float(levels.max())
    if best - untrained > need:
        return None
    return (f"its best level {best:.4g} (mean of {window} evaluation(s)) never rose more than "
            f"monitor.learn_min_gain = {need:g} above {untrained:.4g}, {what}")


def collapse_rule(df: pd.DataFrame, run: Run, window: int | None = None) -> tuple[str, int] | None:
    """The collapse rule on a run's evaluations, with its own ``monitor.collapse_window`` or ``window`` (1: the
    rule of verdict rules v1)."""
    returns = series(df, "eval/return").dropna().sort_index()
    if run.config is None:
        return None
    fraction = float(run.config.monitor.collapse_fraction)
    window = int(run.config.monitor.collapse_window) if window is None else window
    if len(returns) < window + 2:  # a first evaluation, then a best and a later final level
        return None
    levels = _levels(returns, window)
    first, final = float(returns.iloc[0]), float(levels.iloc[-1])
    best_step = int(levels.idxmax())
    best = float(levels.max())
    gain = best - first
    if gain <= 0 or best_step == int(levels.index[-1]) or best - final <= fraction * gain:
        return None
    steps = [int(s) for s in returns.index]

    def level(value: float, end: int) -> str:
        if window == 1:
            return f"{value:.4g} at step {end}"
        start = steps[steps.index(end) - window + 1]
        return f"{value:.4g} (mean of the {window} evaluations at steps {start}-{end})"

    final_step = steps[-1]
    what = "evaluation" if window == 1 else "level"
    return (f"final {what} {level(final, final_step)} lost {(best - final) / gain:.0%} of the gain of its best, "
            f"{level(best, best_step)}, over its first evaluation, {first:.4g} at step {steps[0]} (more than "
            f"monitor.collapse_fraction = {fraction:g}"
            f"{'' if window == 1 else f', monitor.collapse_window = {window}'})",
            final_step)


def judge(run: Run) -> Verdict:
    """The verdicts of one run from its summary and scalars."""
    verdict = Verdict()
    df = run.scalars
    rules = [_nan_guard(run), _non_finite(df), _q_beyond_bound(df, run, verdict), _q_beyond_returns(df, run)]
    fired = [r for r in rules if r is not None]
    if fired:
        verdict.diverged, verdict.diverged_step = fired[0]
    else:  # a diverged run is not also called collapsed or failed: its evaluations predate the failure
        collapse = collapse_rule(df, run)
        if collapse is not None:
            verdict.collapsed, verdict.collapsed_step = collapse
        verdict.failed = _failed_to_learn(df, run)
    for net in NETS:
        spikes, updates = series(df, tags.spikes(net)), series(df, tags.updates(net))
        if len(spikes):
            verdict.spikes[net] = (int(spikes.sum()), int(updates.loc[updates.index.isin(spikes.index)].sum()))
    return verdict
