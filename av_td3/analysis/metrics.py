"""What ``av-td3 compare`` reads from each run and shows, each declared once, and read by the comparison
(:mod:`av_td3.analysis.compare`), its table and its legend (:mod:`av_td3.analysis.report`):

* :data:`METRICS`, the per-run metrics ``compare`` and ``av-td3 plan`` can analyse: the name (the value of
  ``plan.metric`` / ``--metric``), its title, the sentence the report's legend uses, how it is computed from the
  run's own evaluation log (``eval/*``, one point per evaluation of ``trainer.eval_episodes`` fixed-seed
  episodes) and how the table shows it;
* :data:`NET_METRICS`, the gradient quantities read per net from the monitor's tags (:mod:`av_td3.tags`): how a
  run's logging intervals and then a group's runs reduce to one number;
* :data:`NET_COLUMNS`, the table's columns per net: title, cell and legend sentence.

The final evaluation alone is a snapshot of a policy that oscillates from one evaluation to the next: on the
default task (results/clip_study, 12 runs) its within-arm spread is 36% of the mean, while the mean of the
evaluations in the last half of training has about 13% (docs/results/clip-study.md, "The primary metric"). So the
primary metric defaults to the late mean; the snapshot stays available for older reports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from av_td3 import tags
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import nan_guard_stop, untrained_level
from av_td3.tags import NORM_PERCENTILES

NAN = float("nan")


def num(x: float | None, digits: int = 4) -> str:
    """A number as the report shows it: ``digits`` significant digits, thousands whole, "-" when missing."""
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def pct(x: float) -> str:
    """A share as the report shows it, in whole %."""
    return "-" if not np.isfinite(x) else f"{100 * x:.0f}%"


def evaluations(run: Run, tag: str = "eval/return") -> pd.Series:
    """One evaluation quantity of a run, indexed by env step, in step order (empty when never logged)."""
    return series(run.scalars, tag).dropna().sort_index()


def late_start(run: Run, late_fraction: float) -> float:
    """The env step after which an evaluation counts as late: the last ``late_fraction`` of the run's planned
    ``trainer.total_steps`` (a run stopped early has fewer late evaluations, not an earlier window)."""
    assert run.config is not None
    return (1.0 - late_fraction) * float(run.config.trainer.total_steps)


def scored_returns(run: Run) -> pd.Series:
    """``eval/return`` per evaluation, as the return metrics score it (rules v5). A run the NaN guard stopped
    also scores every evaluation its schedule (each ``trainer.eval_every`` steps, and the last step) held after the
    stop, at what the untrained agent scores (:func:`~av_td3.analysis.verdicts.untrained_level`: the mean return of
    its random-action warm-up episodes): a policy that diverged is worth no more than random actions, and leaving
    those evaluations out would drop an arm's worst runs from its mean."""
    returns = evaluations(run, "eval/return")
    guard = nan_guard_stop(run)
    if guard is None or guard.get("step") is None or run.config is None:
        return returns
    stop = int(guard["step"])
    floor = untrained_level(run.scalars, run)
    if floor is None:
        return returns
    t = run.config.trainer
    schedule = {*range(int(t.eval_every), int(t.total_steps) + 1, int(t.eval_every)), int(t.total_steps)}
    missed = sorted(s for s in schedule if s > stop and s not in returns.index)
    if not missed:
        return returns
    filled = pd.Series(floor[0], index=missed, dtype=float)
    return filled if returns.empty else pd.concat([returns, filled]).sort_index()


def in_late_window(run: Run, s: pd.Series, late_fraction: float) -> pd.Series:
    """The points of ``s`` (indexed by env step) in the late window (see :func:`late_start`)."""
    return s[s.index > late_start(run, late_fraction)]


def late(run: Run, tag: str, late_fraction: float) -> pd.Series:
    """The evaluations of ``tag`` in the late window."""
    return in_late_window(run, evaluations(run, tag), late_fraction)


def _mean(s: pd.Series) -> float:
    return float(s.mean()) if len(s) else NAN


def _last(s: pd.Series) -> float:
    return float(s.iloc[-1]) if len(s) else NAN


@dataclass(frozen=True)
class Metric:
    name: str
    title: str          # the table's column title
    what: str           # the report's one-sentence definition
    compute: Callable[[Run, float], float]  # (run, plan.late_fraction) -> value; NaN when the run never logged it
    percent: bool = False  # a share (success rate): shown in %
    column: bool = False   # the table shows its group mean in a column of its own, whatever the primary metric
    digits: int = 4        # significant digits in that column
    legend: str = ""       # that column's sentence in the report's legend

    def show(self, x: float) -> str:
        """A value of the metric as its column shows it."""
        return pct(x) if self.percent else num(x, self.digits)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("late_return", "late return",
           "mean evaluation return over the evaluations in the last plan.late_fraction of training (a run the NaN "
           "guard stopped scores its random-action warm-up return for each evaluation it did not reach)",
           lambda run, f: _mean(in_late_window(run, scored_returns(run), f))),
    Metric("auc_return", "mean eval return (AUC)",
           "mean evaluation return over all evaluations of the run (the area under its learning curve, per evaluation)",
           lambda run, f: _mean(scored_returns(run))),
    Metric("final_return", "final return",
           "the return of the last evaluation alone (a snapshot of one policy: the noisiest of these metrics)",
           lambda run, f: _last(scored_returns(run))),
    Metric("late_success", "late success",
           "mean success rate (episodes that reached their step limit without crashing or leaving the road) over "
           "the late evaluations", lambda run, f: _mean(late(run, "eval/success_rate", f)), percent=True,
           column=True, legend="Late success and collisions: means over the late evaluations."),
    Metric("late_collisions", "late collisions/ep",
           "mean collisions per evaluation episode over the late evaluations",
           lambda run, f: _mean(late(run, "eval/collisions", f)),
           column=True, digits=3),  # its legend is late success's sentence
)}


def late_evaluations(run: Run, late_fraction: float) -> int:
    """How many evaluations a run has in its late window."""
    return len(late(run, "eval/return", late_fraction))


# ------------------------------------------------------------------------------------------ gradients, per net
def _reduce(values: pd.Series, how: str) -> float:
    """``values``' mean, max or median (the finite values'); NaN, without numpy's empty-slice warning, when
    there are none (older runs did not log the quantity)."""
    finite = values.dropna()
    return float(getattr(finite, how)()) if len(finite) else NAN


@dataclass(frozen=True)
class NetMetric:
    """A gradient quantity of each net: ``<net>_<name>`` in a run's row of the comparison and in comparison.csv."""
    name: str
    tag: Callable[[str], str]  # net -> the monitor's tag it is read from
    per_run: str               # how a run's logging intervals reduce: "mean", "max" or "median"
    per_group: str             # how a group's finished runs reduce

    def key(self, net: str) -> str:
        return f"{net}_{self.name}"

    def of_run(self, df: pd.DataFrame, net: str) -> float:
        return _reduce(series(df, self.tag(net)), self.per_run)

    def of_group(self, runs: pd.DataFrame, net: str) -> float:
        return _reduce(runs[self.key(net)], self.per_group)


NET_METRICS: tuple[NetMetric, ...] = (  # in comparison.csv's order
    NetMetric("clip_limit_used", tags.clip_limit, "median", "median"),  # the adaptive modes' limit moves
    NetMetric("clip_fraction", tags.clip_fraction, "mean", "mean"),
    NetMetric("after_clip_max", lambda net: tags.grad_norm(net, "total", tags.AFTER, maximum=True), "max", "max"),
    # the median over the run's logging intervals of each interval's percentile, then over the group's runs
    *(NetMetric(f"norm_p{q}", functools.partial(tags.norm_percentile, q=q), "median", "median")
      for q in NORM_PERCENTILES),
)


def _clipping_cell(s: dict[str, Any], net: str) -> str:
    """How often a net's clip bound, and its limit: per update for the global-norm modes, per unit for AGC (whose
    limit moves with each unit's weight norm, so no single limit is shown); unclipped, the largest norm."""
    if not np.isfinite(s[f"{net}_clip_limit"]):
        return f"unclipped, max norm {num(s[f'{net}_after_clip_max'])}"
    fraction, mode = pct(s[f"{net}_clip_fraction"]), s["clip_mode"]
    if mode == "agc":
        return f"{fraction} of units clipped (agc, lambda {num(s['clip_agc'])})"
    if mode == "norm":
        return f"{fraction} clipped (limit {num(s[f'{net}_clip_limit'])})"
    return f"{fraction} clipped ({mode}, limit used ~{num(s[f'{net}_clip_limit_used'])})"


@dataclass(frozen=True)
class NetColumn:
    """A column of the report's table for each net (titled ``<net> <title>``), filled from a group's row."""
    title: str
    cell: Callable[[dict[str, Any], str], str]  # (the group's row of comparison.csv, net) -> text
    legend: str                                  # its sentence in the report's legend
    missing: str = "-"                           # when the net logged no gradients (agent=pid learns nothing)


_PERCENTILES = "/".join(f"p{q}" for q in NORM_PERCENTILES)
NET_COLUMNS: tuple[NetColumn, ...] = (
    NetColumn("clipping", _clipping_cell,
              "Clipping: share of updates clipped and the limit (for the adaptive modes the median limit used).",
              missing="no gradients logged"),
    NetColumn(f"norm {_PERCENTILES}",
              lambda s, net: "/".join(num(s[f"{net}_norm_p{q}"], 3) for q in NORM_PERCENTILES),
              f"Norm {_PERCENTILES}: percentiles of the before-clip global gradient norm within each logging "
              "interval, median over the run's intervals and the group's runs."),
    NetColumn("spikes /1k upd.", lambda s, net: num(s[f"{net}_spikes_per_1k"], 2),
              "Spikes: updates whose before-clip norm jumped more than monitor.spike_z std above its running "
              "log-mean, per 1,000 updates."),
)
