"""The declared analysis plan (``plan.*`` in a run's config) as ``av-td3 compare`` and ``av-td3 plan`` follow it.

An experiment declares its plan in its config file before its runs start (conf/experiment/*.yaml): the primary
metric, the baseline, the smallest effect of interest, alpha, power, the planned seeds and the version of the
verdict rules (a run without an experiment gets the schema's defaults). Every run records the plan in force when it
started (``.hydra/config.yaml``), so the plan a report follows is the one written before the runs, not one chosen
after seeing them. compare prints it at the top of its report and lists every way the analysis departs from it:
another metric or baseline asked for on the command line, other verdict rules, fewer runs than planned, seeds
that were not planned, runs that record different plans, runs made before plans existed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import RULES, RULES_VERSION
from av_td3.config import PlanConfig


@dataclass(frozen=True)
class Plan:
    metric: str
    late_fraction: float
    baseline: str | None
    effect: float
    alpha: float
    power: float
    seeds: tuple[int, ...]
    rules: int
    recorded: bool  # False: no run records a plan (all predate plans); these are the schema's defaults

    def text(self) -> str:
        """The plan in one line, as the report's header prints it."""
        seeds = ", ".join(map(str, self.seeds)) if self.seeds else "not planned"
        base = f"`{self.baseline}`" if self.baseline else "not named"
        return (f"primary metric {self.metric} (late window: the last {self.late_fraction:.0%} of training), "
                f"baseline {base}, smallest effect of interest ±{self.effect:.0%} of the baseline, "
                f"alpha {self.alpha:g} for the family of comparisons, power {self.power:.0%}, seeds {seeds}, "
                f"verdict rules v{self.rules}")


def _plan(p: Any, recorded: bool) -> Plan:
    """The :class:`Plan` of ``p``: a run's ``plan`` section or a :class:`PlanConfig`."""
    values = {f.name: getattr(p, f.name) for f in fields(PlanConfig)}
    values["seeds"] = tuple(int(s) for s in values["seeds"])
    return Plan(**values, recorded=recorded)


def study_plan(runs: list[Run]) -> tuple[Plan, list[str]]:
    """The plan the runs record (the most common one) and notes on runs that record another or none."""
    plans = [_plan(r.config.plan, r.records_plan) for r in runs if r.config is not None]
    if not plans:
        return _plan(PlanConfig(), recorded=False), []
    recorded = [p for p in plans if p.recorded]
    notes = []
    if not recorded:
        return plans[0], [f"no run records an analysis plan (all {len(plans)} were made before plans existed): the "
                          "schema's default plan is used, chosen after the runs"]
    plan, _ = Counter(recorded).most_common(1)[0]
    others = len(recorded) - recorded.count(plan)
    if others:
        notes.append(f"{others} run(s) record another plan than the {recorded.count(plan)} followed here")
    if len(recorded) < len(plans):
        notes.append(f"{len(plans) - len(recorded)} run(s) were made before plans existed (no plan recorded)")
    return plan, notes


def records(run: Run, plan: Plan) -> bool:
    """Whether ``run`` recorded ``plan`` when it started."""
    return run.config is not None and run.records_plan and _plan(run.config.plan, recorded=True) == plan


def departures(plan: Plan, metric: str, baseline: str | None, seeds_by_group: dict[str, list[int]],
               unplanned: Collection[str] = ()) -> list[str]:
    """Every way this analysis departs from ``plan``: ``metric`` and ``baseline`` are what the analysis uses,
    ``seeds_by_group`` the seeds of each group's finished runs, ``unplanned`` the groups none of whose runs
    records ``plan`` (made before it, or under another): their seed counts are said to be so, since the plan
    may not have meant them at all (e.g. an arm's runs at a setting the plan replaced)."""
    out = []
    if metric != plan.metric:
        out.append(f"the metric analysed is {metric}, the plan's primary metric is {plan.metric}")
    if plan.baseline is not None and baseline is not None and baseline != plan.baseline:
        out.append(f"the baseline is `{baseline}`, the plan's is `{plan.baseline}`")
    if plan.rules != RULES_VERSION:
        out.append(f"the plan was written for verdict rules v{plan.rules} ({RULES.get(plan.rules, 'unknown')}); "
                   f"this report uses v{RULES_VERSION}")
    if plan.seeds:
        for label, seeds in seeds_by_group.items():
            missing = sorted(set(plan.seeds) - set(seeds))
            extra = sorted(set(seeds) - set(plan.seeds))
            why = "; none of its runs records this plan" if label in unplanned else ""
            if missing:
                out.append(f"`{label}`: {len(seeds)} of {len(plan.seeds)} planned seeds finished (missing "
                           f"{', '.join(map(str, missing))}{why})")
            if extra:
                out.append(f"`{label}`: seeds {', '.join(map(str, extra))} are not in the plan")
    return out
