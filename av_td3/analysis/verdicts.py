"""Verdicts from evidence, one rule each, shared by ``av-td3 validate`` and ``av-td3 compare``.

* **diverged** means numerical failure and nothing else: the NaN guard stopped the run, a logged quantity went
  non-finite, or |Q| (or |actor loss|) passed the reward bound ``max|r| / (1 - gamma) * monitor.q_margin``
  (:func:`av_td3.bounds.q_bound`). A large gradient norm is not divergence: clipping exists for it.
* **collapsed** is a learning outcome, reported apart: the run's final level lost more than
  ``monitor.collapse_fraction`` of what its best level had gained over its first evaluation (the untrained
  policy's). A level is the mean of ``monitor.collapse_window`` consecutive evaluations (final: the last ones;
  best: the best such run of them), so one noisy evaluation of a few episodes neither makes nor hides a
  collapse; a window of 1 compares single evaluations.
* **gradient spikes** are counted by the monitor against each net's own norm history (``grad/<net>/spikes``,
  see :class:`av_td3.agent.monitor.SpikeDetector`) and reported per 1,000 updates.

Each verdict carries the rule that fired and the step, so a report can say why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.bounds import q_bound

NETS = ("actor", "critic")
# |actor loss| = |mean Q of the policy's actions|, so it is held to the same bound as the critics' Q values.
Q_TAGS = ("train/q1", "train/q2", "train/q_abs_max", "train/actor_loss", "train/actor_loss_max")


@dataclass
class Verdict:
    diverged: str | None = None         # the rule that fired and where; None: not diverged
    diverged_step: int | None = None
    collapsed: str | None = None        # the rule with its numbers; None: not collapsed (or too few evaluations)
    collapsed_step: int | None = None
    spikes: dict[str, tuple[int, int]] = field(default_factory=dict)  # net -> (spikes, updates), when logged
    q_abs_max: float = float("nan")     # largest |Q-like| value logged, for tables

    def spike_rate(self, net: str) -> float:
        """Spikes per 1,000 updates of ``net`` (NaN when not logged or no updates)."""
        spikes, updates = self.spikes.get(net, (0, 0))
        return 1000.0 * spikes / updates if updates else float("nan")


def _nan_guard(run: Run) -> tuple[str, int | None] | None:
    guard = (run.summary or {}).get("nan_guard") or {}
    if not guard.get("triggered"):
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


def _collapse(df: pd.DataFrame, run: Run) -> tuple[str, int] | None:
    returns = series(df, "eval/return").dropna().sort_index()
    if run.config is None:
        return None
    fraction = float(run.config.monitor.collapse_fraction)
    window = int(run.config.monitor.collapse_window)
    if len(returns) < window + 2:  # a first evaluation, then a best and a later final level
        return None
    levels = returns.iloc[1:].rolling(window).mean().dropna()  # indexed by each window's last step
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
            f"monitor.collapse_fraction = {fraction:g}{'' if window == 1 else f', monitor.collapse_window = {window}'})",
            final_step)


def judge(run: Run) -> Verdict:
    """The verdicts of one run from its summary and scalars."""
    verdict = Verdict()
    df = run.scalars
    rules = [_nan_guard(run), _non_finite(df), _q_beyond_bound(df, run, verdict)]
    fired = [r for r in rules if r is not None]
    if fired:
        verdict.diverged, verdict.diverged_step = fired[0]
    else:  # a diverged run is not also called collapsed: its evaluations predate the failure
        collapse = _collapse(df, run)
        if collapse is not None:
            verdict.collapsed, verdict.collapsed_step = collapse
    for net in NETS:
        spikes, updates = series(df, f"grad/{net}/spikes"), series(df, f"grad/{net}/updates")
        if len(spikes):
            verdict.spikes[net] = (int(spikes.sum()), int(updates.loc[updates.index.isin(spikes.index)].sum()))
    return verdict
