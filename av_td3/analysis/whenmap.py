"""``av-td3 compare --axis KEY``: the "when" map. The runs are split into stress levels by the value of one or more
config keys (``--axis agent.optimizer --axis agent.lr.critic``); at each level every arm is compared with that
level's own baseline exactly as ``compare`` compares a study (:func:`av_td3.analysis.compare.summarize`), and all
comparisons of the map share the plan's alpha (Bonferroni over arms x levels), so that scanning the levels for
"where clipping starts to matter" is not a fishing trip. A level whose runs record another study's plan (the main
study's default condition read beside a map of stress levels) is compared under that plan, outside the map's
family. Output: ``when_map.md`` (one table of effects, one of how
often each arm's clip bound), ``when_map.csv`` (one row per level and group), ``plots/when_map.png`` and each
level's full report under ``levels/<n>_<level>/comparison.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from av_td3.analysis.compare import Report
from av_td3.analysis.plan import Plan, records, study_plan
from av_td3.analysis.plots import plot_when_map
from av_td3.analysis.report import markdown_table, write_comparison
from av_td3.analysis.runs import Run
from av_td3.rundir import flatten
from av_td3.tags import NETS

# The columns of when_map.csv taken from each level's comparison.csv row.
COLUMNS = ("group", "is_baseline", "n", "mean", "effect_pct", "effect_pct_low", "effect_pct_high", "verdict",
           "p_holm", "actor_clip_fraction", "critic_clip_fraction", "diverged", "failed", "total_steps")


@dataclass
class Level:
    label: str              # "agent.optimizer=sgd, agent.lr.critic=0.03"
    runs: list[Run]
    report: Report | None   # None: no comparison at this level (``problem`` says why)
    problem: str = ""
    folder: str = ""        # its full report, relative to the map's folder
    beside: bool = False    # its runs record another study's plan: compared under that plan, outside the map's family


@dataclass
class WhenMap:
    axis: list[str]
    levels: list[Level]     # in axis order (numeric values by size)
    table: pd.DataFrame     # one row per (level, group): COLUMNS plus "level"
    margin: float           # the plan's smallest effect of interest, a share of the baseline
    alpha: float            # per comparison: the plan's alpha over every comparison of the map
    comparisons: int        # the family: the comparisons of the levels the map's plan covers
    metric: str


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _order(values: tuple[Any, ...]) -> tuple[tuple[int, Any], ...]:
    """Numbers by size, before anything else (text, null) in text order."""
    return tuple((0, float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, _value_text(v))
                 for v in values)


def split_levels(runs: list[Run], axis: list[str]) -> list[tuple[str, list[Run]]]:
    """The runs per level of ``axis`` (the values of those config keys), in axis order. Raises ValueError naming
    a key no run's config has, or an axis along which all runs sit at one level."""
    flats = [flatten(r.known_config) for r in runs]
    for key in axis:
        if not any(key in f for f in flats):
            varying = sorted({k for f in flats for k in f if len({repr(g.get(k)) for g in flats}) > 1})
            raise ValueError(f"--axis {key}: no run's config has this key; keys that differ between these runs: "
                             f"{', '.join(varying) or 'none'}")
    by_level: dict[tuple[Any, ...], list[Run]] = {}
    for run, flat in zip(runs, flats):
        by_level.setdefault(tuple(flat.get(k) for k in axis), []).append(run)
    if len(by_level) < 2:
        raise ValueError(f"--axis {' --axis '.join(axis)}: every run sits at one level, so there is no map; give "
                         "a key whose value differs between the runs")
    return [(", ".join(f"{k}={_value_text(v)}" for k, v in zip(axis, values)), by_level[values])
            for values in sorted(by_level, key=_order)]


def _beside(level_runs: list[Run], plan: Plan) -> bool:
    """Whether a level's runs belong to another study, read beside the map (e.g. the main study's default
    condition next to a map of stress levels): the map's plan is a recorded one, no run of the level records it
    and some record another. Such a level is compared under its own plan's family of comparisons; the map's
    alpha is shared only by the levels its plan declared."""
    return (plan.recorded and not any(records(r, plan) for r in level_runs)
            and any(r.records_plan for r in level_runs))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def write_when_map(runs: list[Run], axis: list[str], out: Path, baseline: str | None = None,
                   metric: str | None = None) -> WhenMap:
    """Compare the arms of each level of ``axis`` with that level's baseline (``baseline``: a group label as the
    level's own comparison names it, e.g. ``arm=td3_noclip``; default: the plan's) and write the map into
    ``out``. Raises ValueError for an unknown key or metric, or a baseline no level has."""
    grouped = [r for r in runs if r.config is not None]
    split = split_levels(grouped, axis)
    plan, _ = study_plan(grouped)
    beside = {label for label, level_runs in split if _beside(level_runs, plan)}
    in_map = len(split) - len(beside)
    levels, rows = [], []
    for i, (label, level_runs) in enumerate(split):
        folder = f"levels/{i}_{_slug(label)}"
        try:
            report = write_comparison(level_runs, out / folder, baseline, metric,
                                      levels=1 if label in beside else in_map).summary
        except ValueError as e:  # this level has no such baseline group (or no run with a config)
            levels.append(Level(label, level_runs, None, str(e), beside=label in beside))
            continue
        level = Level(label, level_runs, report, folder=folder, beside=label in beside)
        if report.baseline is None:
            level.problem = "no baseline group at this level"
        levels.append(level)
        for s in report.table.to_dict("records"):
            rows.append({"level": label, **{c: s.get(c) for c in COLUMNS}})
    if all(level.report is None or level.report.baseline is None for level in levels):
        raise ValueError("no level has the baseline group "
                         f"{baseline or plan.baseline!r}: " + "; ".join(f"{lv.label}: {lv.problem}" for lv in levels))
    comparisons = max((lv.report.power.comparisons for lv in levels
                       if lv.report and lv.report.power and not lv.beside), default=1)
    table = pd.DataFrame(rows, columns=["level", *COLUMNS])
    result = WhenMap(axis, levels, table, plan.effect, plan.alpha / comparisons, comparisons,
                     metric or plan.metric)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_when_map(table, [lv.label for lv in levels], plan.effect, result.metric, 1 - result.alpha,
                  out / "plots" / "when_map.png")
    table.to_csv(out / "when_map.csv", index=False)
    (out / "when_map.md").write_text(markdown(result))
    return result


def _pct(x: Any) -> str:
    return f"{100 * x:+.0f}%" if x is not None and np.isfinite(x) else "-"


def _effect_cell(s: dict[str, Any]) -> str:
    if s["is_baseline"]:
        return f"baseline, mean {s['mean']:.4g} (n={s['n']})" if np.isfinite(s["mean"]) else f"baseline (n={s['n']})"
    if not np.isfinite(s["effect_pct"]):
        return f"- (n={s['n']})"
    return (f"{_pct(s['effect_pct'])} [{_pct(s['effect_pct_low'])}, {_pct(s['effect_pct_high'])}] "
            f"{s['verdict']} (n={s['n']})")


def _clip_cell(s: dict[str, Any]) -> str:
    shares = [s[f"{net}_clip_fraction"] for net in NETS]
    return " / ".join(f"{100 * x:.1f}%" if x is not None and np.isfinite(x) else "-" for x in shares)


def _grid(result: WhenMap, cell: Any) -> str:
    """A markdown table: one row per group, one column per level."""
    records = result.table.to_dict("records")
    groups = sorted({s["group"] for s in records}, key=lambda g: (not any(s["is_baseline"] for s in records
                                                                          if s["group"] == g), g))
    out = []
    for group in groups:
        row = {"group": f"`{group}`"}
        for level in result.levels:
            found = [s for s in records if s["group"] == group and s["level"] == level.label]
            row[level.label] = cell(found[0]) if found else "not run"
        out.append(row)
    return markdown_table(out)


def markdown(result: WhenMap) -> str:
    """when_map.md: the axis, the effect table, the clip table, the levels without a comparison, the plot."""
    md = [f"# When does clipping matter? {len(result.levels)} levels of {', '.join(result.axis)}", "",
          (f"At each level every arm is compared with that level's baseline on `{result.metric}` (difference of "
          f"means in % of the baseline's mean). Intervals are {1 - result.alpha:.2%} intervals: the plan's alpha "
          f"shared by all {result.comparisons} comparisons of the map (Bonferroni), so a level where an interval "
          f"excludes 0 is not picked out of many looks. Verdicts as in `compare` (better / worse need at least 5 "
          f"runs per group and an interval excluding 0; equivalent within the smallest effect of interest of the "
          f"plan the level's runs record (±{result.margin:.0%} on the plot: the plan most runs record); otherwise "
          f"inconclusive). Each level's full report, with its power and run verdicts, is linked below."),
          "", "## Effect against the level's baseline", "", _grid(result, _effect_cell), "",
          "## Share of updates clipped (actor / critic)", "",
          "Where an arm's limit binds on no update, it cannot be what differs at that level.", "",
          _grid(result, _clip_cell), "", "## Levels", ""]
    for level in result.levels:
        where = f"[report]({level.folder}/comparison.md)" if level.folder else "no report"
        extra = f": {level.problem}" if level.problem else ""
        if level.beside:
            extra += (" (read beside the map: its runs record another study's plan, so its intervals are that "
                      "plan's own, outside the map's family of comparisons)")
        md.append(f"- `{level.label}`: {len(level.runs)} run(s), {where}{extra}")
    md += ["", "![when map](plots/when_map.png)"]
    return "\n".join(md) + "\n"
