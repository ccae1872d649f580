"""The per-run metrics ``av-td3 compare`` and ``av-td3 plan`` can analyse, each declared once: its name (the value
of ``plan.metric`` / ``--metric``), its column title, the sentence the report's legend uses, and how it is
computed from the run's own evaluation log (``eval/*``, one point per evaluation of ``trainer.eval_episodes``
fixed-seed episodes).

The final evaluation alone is a snapshot of a policy that oscillates from one evaluation to the next: on the
default task (results/clip_study, 12 runs) its within-arm spread is 36% of the mean, while the mean of the
evaluations in the last half of training has about 13% (docs/results/clip-study.md, "The primary metric"). So the
primary metric defaults to the late mean; the snapshot stays available for older reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from av_td3.analysis.events import series
from av_td3.analysis.runs import Run

NAN = float("nan")


def evaluations(run: Run, tag: str = "eval/return") -> pd.Series:
    """One evaluation quantity of a run, indexed by env step, in step order (empty when never logged)."""
    return series(run.scalars, tag).dropna().sort_index()


def late_start(run: Run, late_fraction: float) -> float:
    """The env step after which an evaluation counts as late: the last ``late_fraction`` of the run's planned
    ``trainer.total_steps`` (a run stopped early has fewer late evaluations, not an earlier window)."""
    assert run.config is not None
    return (1.0 - late_fraction) * float(run.config.trainer.total_steps)


def late(run: Run, tag: str, late_fraction: float) -> pd.Series:
    """The evaluations of ``tag`` in the late window (see :func:`late_start`)."""
    s = evaluations(run, tag)
    return s[s.index > late_start(run, late_fraction)]


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


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("late_return", "late return",
           "mean evaluation return over the evaluations in the last plan.late_fraction of training",
           lambda run, f: _mean(late(run, "eval/return", f))),
    Metric("auc_return", "mean eval return (AUC)",
           "mean evaluation return over all evaluations of the run (the area under its learning curve, per evaluation)",
           lambda run, f: _mean(evaluations(run, "eval/return"))),
    Metric("final_return", "final return",
           "the return of the last evaluation alone (a snapshot of one policy: the noisiest of these metrics)",
           lambda run, f: _last(evaluations(run, "eval/return"))),
    Metric("late_success", "late success",
           "mean success rate (episodes that reached their step limit without crashing or leaving the road) over "
           "the late evaluations", lambda run, f: _mean(late(run, "eval/success_rate", f)), percent=True),
    Metric("late_collisions", "late collisions/ep",
           "mean collisions per evaluation episode over the late evaluations",
           lambda run, f: _mean(late(run, "eval/collisions", f))),
)}


def late_evaluations(run: Run, late_fraction: float) -> int:
    """How many evaluations a run has in its late window."""
    return len(late(run, "eval/return", late_fraction))
