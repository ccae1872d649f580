"""``av-td3 compare``, the numbers: group runs by configuration (seeds pooled), each group's primary metric (the
declared plan's, :mod:`av_td3.analysis.plan`) with its spread, each group's effect against the baseline with a
family-adjusted interval and a verdict the interval supports, the power of the comparison (the smallest effect
these runs detect, the seeds a plan's effect needs), run verdicts (diverged, collapsed, failed to learn),
gradient spikes and the scale of the gradient norms next to the clip limits. :mod:`av_td3.analysis.report` puts them
into words, tables and plots (``comparison.md``, ``comparison.csv``, ``plots/*.png``).

Runs are grouped by their configuration, not by the folder or sitting they come from: live run folders and
archived runs (``av-td3 archive``) from several machines pool into one group when their configurations match,
keys that never change what is computed aside (:mod:`av_td3.rundir`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from av_td3.analysis import stats
from av_td3.analysis.metrics import METRICS, NET_METRICS, late_evaluations
from av_td3.analysis.plan import Plan, departures, records, study_plan
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import collapse_rule, judge, nan_guard_stop
from av_td3.config import ClipConfig
from av_td3.rundir import (COMPLETED, DEFAULTS_CHANGED, STOPPED, UNNAMED_OVERRIDES, flatten, is_experiment_key,
                           schema_default, without_other_backends)
from av_td3.tags import NETS

# A limit that binds on at most / at least this share of updates "never binds" / "binds on every update".
NEVER_BINDS, ALWAYS_BINDS = 0.001, 0.99
# Fewer finished runs than this in a group or its baseline: no better / worse / equivalent verdict, however
# narrow the interval looks (at n=3 a t interval rests on a spread estimated from 2 degrees of freedom).
MIN_RUNS_FOR_VERDICT = 5
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------- grouping
@dataclass
class Group:
    label: str         # "default" or "key=value,key=value"
    items: list[str]   # the label's key=value parts (fewer = closer to the defaults)
    runs: list[Run]


def _value_text(value: Any) -> str:
    """A value as an override writes it (null, true/false), so a group label can be typed back."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _override_items(overrides: list[str], flat: dict[str, Any]) -> list[str]:
    """The overrides that define the experiment, values normalised through the run's config (so ``=1`` and
    ``=1.0`` land in one group); config-group choices (``agent=ddpg``) are kept as written. A key whose shipped
    default changed since the run (:data:`av_td3.rundir.DEFAULTS_CHANGED`) and that the run holds at another value
    without an override or a config-group choice is added, so an old default is named (``env.view=world``)."""
    items = []
    for override in overrides:
        override = override.lstrip("+")
        key = override.partition("=")[0]
        # presets and run-only keys; the seed and the other keys that are no experiment key are left out too
        if key in UNNAMED_OVERRIDES or not is_experiment_key(key) or key.startswith(("hydra.", "hydra/")):
            continue
        items.append(f"{key}={_value_text(flat[key])}" if key in flat else override)
    chosen = {item.partition("=")[0] for item in items}
    if not any("." not in key for key in chosen):  # a group choice (arm=, agent=) may have set any key
        items += [f"{key}={_value_text(flat[key])}" for key in DEFAULTS_CHANGED
                  if key in flat and key not in chosen and flat[key] != schema_default(key)]
    return sorted(items)


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str], list[str]]:
    """Group runs (each with a config) whose configurations match, the seed and keys that do not change what is
    computed aside, wherever and whenever they ran. A group is labelled by its runs' overrides minus the seed and
    minus overrides that do not change the experiment (the label most of its runs share); runs without
    overrides.yaml are labelled by the config keys that differ between the runs.

    Returns the groups sorted by label, warnings (runs launched under one label that differ in their configs,
    e.g. a smoke run next to full ones, are split and named; a group pooling runs launched differently, from
    different code versions, or with a seed twice), and the overrides every run shares
    (``python launch.py -m experiment=X agent.encoder=shared``): those are left out of the labels, so
    ``arm=td3`` stays ``arm=td3`` whatever else the sweep's command line set.
    """
    flats = [without_other_backends(flatten(r.known_config)) for r in runs]
    keys = sorted({k for f in flats for k in f if is_experiment_key(k)})
    varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    run_items = [_override_items(run.overrides, flat) if run.overrides is not None
                 else [f"{k}={_value_text(flat.get(k))}" for k in varying] for run, flat in zip(runs, flats)]
    common: list[str] = []
    if len({tuple(items) for items in run_items}) > 1:
        common = sorted(set.intersection(*(set(items) for items in run_items)))
        run_items = [[i for i in items if i not in common] for items in run_items]

    by_config: dict[tuple, list[int]] = {}
    for i, flat in enumerate(flats):
        by_config.setdefault(tuple(repr(flat.get(k)) for k in varying), []).append(i)
    warnings: list[str] = []
    named: list[tuple[list[str], list[int]]] = []
    launched = [[tuple(run_items[i]) for i in members] for members in by_config.values()]
    unanimous = {labels[0] for labels in launched if len(set(labels)) == 1}
    for members, labels in zip(by_config.values(), launched):
        # the most common way its runs were launched, then the shortest; not a name another group has
        ranked = sorted(set(labels), key=lambda t: (-labels.count(t), len(t), t))
        picked = next((t for t in ranked if t not in unanimous or len(ranked) == 1), ranked[0])
        if len(ranked) > 1:
            shown = sorted({",".join(t) or "default" for t in labels})
            warnings.append(f"group `{','.join(picked) or 'default'}` pools runs launched as {', '.join(shown)}: "
                            "their configurations are the same")
        named.append((list(picked), members))
    # Runs launched under one label whose configurations differ (debug=smoke is not a label item): split, named.
    by_label: dict[str, list[int]] = {}
    for n, (items, _) in enumerate(named):
        by_label.setdefault(",".join(items), []).append(n)
    for label, clashing in by_label.items():
        if len(clashing) < 2:
            continue
        differ = [k for k in varying if len({repr(flats[named[n][1][0]].get(k)) for n in clashing}) > 1]
        # a preset that explains the difference (debug=smoke) names it in a word; else the keys themselves
        presets = [sorted(set.intersection(*(runs[i].presets for i in named[n][1]))) for n in clashing]
        by_preset = len({tuple(p) for p in presets}) == len(clashing)
        for n, preset in zip(clashing, presets):
            flat = flats[named[n][1][0]]
            marks = ([f"[{p}]" for p in preset] if by_preset else
                     [f"[{k}={_value_text(flat.get(k))}]" for k in differ])
            named[n] = (named[n][0] + marks, named[n][1])
        warnings.append(f"runs launched as `{label or 'default'}` differ in their configs ({', '.join(differ)}): "
                        f"split into {len(clashing)} groups")
    groups = {}
    for items, members in named:
        label = ",".join(items) or "default"
        group = groups[label] = Group(label, items, [runs[i] for i in members])
        versions = sorted({r.code_version for r in group.runs if r.code_version})
        if len(versions) > 1:
            warnings.append(f"group `{label}` pools runs from {len(versions)} code versions: {', '.join(versions)}")
        episodes = sorted({int(r.known_config.trainer.eval_episodes) for r in group.runs})
        if len(episodes) > 1:
            warnings.append(f"group `{label}` pools runs evaluated on {' and '.join(map(str, episodes))} episodes per "
                            "evaluation: the same training, measured with different precision")
        seeds = [r.seed for r in group.runs]
        twice = sorted({s for s in seeds if seeds.count(s) > 1 and s is not None})
        if twice:
            warnings.append(f"group `{label}` holds seed(s) {', '.join(map(str, twice))} more than once (the same "
                            "run archived twice, or rerun): each counts as a run")
    return [groups[k] for k in sorted(groups)], warnings, common


def default_baseline(groups: list[Group]) -> Group | None:
    """The group clipping both networks at the schema's default limits (the fewest overrides if several)."""
    clip = ClipConfig()
    candidates = [g for g in groups if all(r.known_config.agent.clip.actor == clip.actor
                                           and r.known_config.agent.clip.critic == clip.critic
                                           and r.known_config.agent.clip.mode == clip.mode
                                           for r in g.runs)]
    return min(candidates, key=lambda g: (len(g.items), g.label), default=None)


# ----------------------------------------------------------------------------------------------------- metrics
def run_metrics(run: Run, late_fraction: float) -> dict[str, Any]:
    """One run's numbers for the comparison (NaN where the run never logged the quantity); every metric of
    :data:`av_td3.analysis.metrics.METRICS` under its name, every one of ``NET_METRICS`` per net."""
    df = run.scalars
    summary = run.summary or {}
    verdict = judge(run)
    m: dict[str, Any] = {"run": run.name, "state": run.state, "finished": run.finished, "seed": run.seed,
                         "steps": summary.get("steps"), "total_steps": summary.get("total_steps"),
                         "reason": summary.get("reason"), "wall_s": summary.get("wall_s"),
                         "code_version": run.code_version,
                         "machine": (summary.get("provenance") or {}).get("machine")}
    for name, metric in METRICS.items():
        m[name] = metric.compute(run, late_fraction)
    m["late_evaluations"] = late_evaluations(run, late_fraction)
    m["eval_episodes"] = int(run.known_config.trainer.eval_episodes)
    for net in NETS:
        for net_metric in NET_METRICS:
            m[net_metric.key(net)] = net_metric.of_run(df, net)
        spikes, updates = verdict.spikes.get(net, (NAN, NAN))
        m[f"{net}_spikes"], m[f"{net}_spike_updates"] = spikes, updates
    m["alerts"] = {k: int(v) for k, v in (summary.get("alerts") or {}).items() if v}
    m["nan_guard"] = nan_guard_stop(run) is not None
    m["diverged"] = verdict.diverged is not None
    m["diverged_why"] = verdict.diverged
    m["collapsed"] = verdict.collapsed is not None
    m["collapsed_why"] = verdict.collapsed
    m["failed"] = verdict.failed is not None
    m["failed_why"] = verdict.failed
    # the collapse rule of verdict rules v1 (window 1), for runs made before the window existed (see notes)
    m["predates_collapse_window"] = "monitor.collapse_window" not in run.recorded_keys
    m["collapsed_v1"] = collapse_rule(df, run, window=1) is not None
    return m


def _by_seed(rows: pd.DataFrame, metric: str) -> pd.Series:
    return rows.dropna(subset=[metric]).set_index("seed")[metric]


def _same_seeds(x: pd.Series, y: pd.Series) -> bool:
    return len(x) > 0 and x.index.is_unique and y.index.is_unique and set(x.index) == set(y.index)


def improvement(rows: pd.DataFrame, base: pd.DataFrame, metric: str = "final_return") -> dict[str, Any]:
    """P(a run of one group beats a baseline run on ``metric``) with its bootstrap interval (comparison.csv);
    runs are paired by seed when both groups have exactly the same seeds, each once."""
    x, y = _by_seed(rows, metric), _by_seed(base, metric)
    paired = _same_seeds(x, y)
    if paired:
        y = y.loc[x.index]
    out = {"p_improvement": NAN, "p_ci_low": NAN, "p_ci_high": NAN, "p_paired": paired}
    if len(x) and len(y):
        out["p_improvement"] = stats.probability_of_improvement(x.to_numpy(), y.to_numpy(), paired=paired)
        if min(len(x), len(y)) >= 2:
            out["p_ci_low"], out["p_ci_high"] = stats.probability_of_improvement_ci(
                x.to_numpy(), y.to_numpy(), paired=paired)
    return out


def _median(values: pd.Series) -> float:
    """The median of the finite values; NaN, without numpy's empty-slice warning, when there are none (older
    runs did not log the quantity)."""
    finite = values.dropna()
    return float(finite.median()) if len(finite) else NAN


def summarize_group(group: Group, rows: pd.DataFrame, metric: str) -> dict[str, Any]:
    """One group's row of comparison.csv (without the comparison to the baseline); ``rows``: its runs' metrics,
    ``metric``: the primary metric's name."""
    fin = rows[rows["finished"]]
    values = fin[metric].dropna().to_numpy()
    cfg = group.runs[0].known_config
    n = len(values)
    s: dict[str, Any] = {
        "group": group.label, "runs": len(rows), "completed": int((rows["state"] == COMPLETED).sum()),
        "stopped": int(((rows["state"] == STOPPED) & rows["finished"]).sum()),
        "incomplete": int((~rows["finished"]).sum()),
        "seeds": sorted(int(x) for x in fin["seed"].dropna()),
        "total_steps": int(np.median([int(r.known_config.trainer.total_steps) for r in group.runs])),
        "metric": metric, "n": n,
        "mean": float(np.mean(values)) if n else NAN,
        "sd": float(np.std(values, ddof=1)) if n >= 2 else NAN,
        "ci_low": NAN, "ci_high": NAN,
        "values_by_seed": "; ".join(f"{int(sd)}: {v:.4g}" for sd, v in zip(fin["seed"], fin[metric])
                                    if pd.notna(sd) and pd.notna(v)),
        "late_evaluations": _median(fin["late_evaluations"].astype(float)),
        "eval_episodes": "/".join(str(e) for e in sorted(set(fin["eval_episodes"]))),
        "wall_h_mean": float(fin["wall_s"].dropna().mean() / 3600) if fin["wall_s"].notna().any() else NAN,
        "clip_mode": str(cfg.agent.clip.mode),
        "clip_agc": float(cfg.agent.clip.agc),
        # the machines its finished runs recorded (summary.json provenance; runs before the record: "not recorded")
        "machines": "; ".join(sorted({m if isinstance(m, str) else "not recorded" for m in fin["machine"]})),
    }
    s["cv"] = s["sd"] / abs(s["mean"]) if n >= 2 and s["mean"] != 0 else NAN
    if n >= 2:
        s["ci_low"], s["ci_high"] = stats.mean_ci(values)
    for name in METRICS:
        s[f"{name}_mean"] = float(fin[name].mean()) if fin[name].notna().any() else NAN
    for net in NETS:
        limit = cfg.agent.clip[net]
        s[f"{net}_clip_limit"] = NAN if limit is None else float(limit)
        for net_metric in NET_METRICS:
            s[net_metric.key(net)] = net_metric.of_group(fin, net)
        updates = fin[f"{net}_spike_updates"].sum(min_count=1)
        s[f"{net}_spikes_per_1k"] = (1000.0 * fin[f"{net}_spikes"].sum() / updates
                                     if pd.notna(updates) and updates > 0 else NAN)
    alerts: dict[str, int] = {}
    for run_alerts in fin["alerts"]:
        for name, count in run_alerts.items():
            alerts[name] = alerts.get(name, 0) + count
    s["alerts"] = sum(alerts.values())
    s["alerts_by_name"] = "; ".join(f"{k}: {v}" for k, v in sorted(alerts.items()))
    s["nan_guard_stops"] = int(fin["nan_guard"].sum())
    for verdict in ("diverged", "collapsed", "failed"):
        s[verdict] = int(fin[verdict].sum())
    s["finished"] = len(fin)
    return s


# ------------------------------------------------------------------------------------------------ effects
@dataclass
class Power:
    """What the runs can detect: the within-group SD pooled over all groups, the smallest difference a
    comparison at the runs' n detects with the plan's power at the family-adjusted alpha, and the runs per group
    the plan's smallest effect of interest needs."""
    sd: float             # pooled within-group SD of the primary metric
    base_mean: float      # the baseline's mean primary metric (the unit of the % figures)
    n: int                # the fewest finished runs with the metric among the compared groups
    comparisons: int      # the family the alpha is shared by: groups compared with the baseline (x levels of a map)
    alpha: float          # per comparison: plan.alpha / comparisons (Bonferroni)
    detectable: float     # smallest detectable difference at n, in metric units
    runs_for_effect: int  # runs per group to detect plan.effect x base_mean (-1: unknown)

    @property
    def detectable_share(self) -> float:
        return self.detectable / self.base_mean if self.base_mean > 0 else NAN


def _family(rows: list[dict[str, Any]], base_label: str, plan: Plan, levels: int = 1) -> tuple[
        dict[str, Any], list[dict[str, Any]], int]:
    """The baseline's row, the rows compared with it (>= 2 runs with the metric) and the size of the family the
    plan's alpha is shared by (Bonferroni): those comparisons, times ``levels`` when they are one level of a
    "when" map (:mod:`av_td3.analysis.whenmap`). The same family for the intervals and the power."""
    base = next(s for s in rows if s["group"] == base_label)
    others = [s for s in rows if s is not base and s["n"] >= 2]
    return base, others, max(1, len(others)) * levels


def power_of(rows: list[dict[str, Any]], metrics: dict[str, pd.DataFrame], base_label: str | None, plan: Plan,
             metric: str, levels: int = 1) -> Power | None:
    """What the comparison of ``rows``' groups with the baseline can detect (None without a baseline)."""
    if base_label is None:
        return None
    base, others, family = _family(rows, base_label, plan, levels)
    alpha = plan.alpha / family
    sd = stats.pooled_sd([metrics[s["group"]].query("finished")[metric].dropna() for s in rows])
    n = min(s["n"] for s in others + [base])
    return Power(sd, base["mean"], n, family, alpha, stats.detectable_difference(n, sd, alpha, plan.power),
                 stats.runs_needed(plan.effect * base["mean"], sd, alpha, plan.power) if base["mean"] > 0 else -1)


def effects_against_baseline(rows: list[dict[str, Any]], metrics: dict[str, pd.DataFrame], base_label: str | None,
                             plan: Plan, metric: str, levels: int = 1) -> None:
    """Fill each group's row with its effect against the baseline (difference of means, % of the baseline's
    mean, the family-adjusted interval, Holm-adjusted p) and its verdict."""
    for s in rows:
        s.update(effect=NAN, effect_low=NAN, effect_high=NAN, effect_pct=NAN, effect_pct_low=NAN,
                 effect_pct_high=NAN, p_value=NAN, p_holm=NAN, paired=False, verdict="", is_baseline=False)
    if base_label is None:
        return
    base, others, family = _family(rows, base_label, plan, levels)
    alpha = plan.alpha / family
    base["is_baseline"] = True
    y_all = _by_seed(metrics[base_label].query("finished"), metric)
    if base["n"] < 2:
        return
    pvalues = []
    for s in others:
        x = _by_seed(metrics[s["group"]].query("finished"), metric)
        y = y_all
        paired = _same_seeds(x, y) and stats.pairs_correlate(x.to_numpy(), y.loc[x.index].to_numpy())
        if paired:
            y = y.loc[x.index]
        d = stats.difference(x.to_numpy(), y.to_numpy(), confidence=1 - alpha, paired=paired)
        s.update(effect=d.diff, effect_low=d.low, effect_high=d.high, p_value=d.p, paired=paired)
        if base["mean"] > 0:
            s.update(effect_pct=d.diff / base["mean"], effect_pct_low=d.low / base["mean"],
                     effect_pct_high=d.high / base["mean"])
        pvalues.append(d.p)
        enough = min(s["n"], base["n"]) >= MIN_RUNS_FOR_VERDICT
        margin = plan.effect * base["mean"]
        if enough and d.low > 0:
            s["verdict"] = "better"
        elif enough and d.high < 0:
            s["verdict"] = "worse"
        elif enough and base["mean"] > 0 and -margin <= d.low and d.high <= margin:
            s["verdict"] = "equivalent"
        else:
            s["verdict"] = "inconclusive"
    for s, p in zip(others, stats.holm(pvalues)):
        s["p_holm"] = p


# ------------------------------------------------------------------------------------------------------- main
@dataclass
class Report:
    groups: list[Group]
    baseline: Group | None
    chosen: bool                        # the baseline was named with --baseline or by the plan
    metrics: dict[str, pd.DataFrame]    # per group label: one row of run_metrics per run
    table: pd.DataFrame                 # per group: the numbers of comparison.csv
    warnings: list[str]
    ungrouped: list[Run]                # runs without a config (bare event files)
    common: list[str]                   # overrides every run shares, left out of the group labels
    plan: Plan                          # the plan the runs declare (or the schema's default plan)
    metric: str                         # the primary metric analysed
    plan_notes: list[str]               # runs that declare another plan, or none
    departures: list[str]               # every way this analysis departs from the plan
    power: Power | None                 # None: no baseline


def summarize(runs: list[Run], baseline: str | None = None, metric: str | None = None, levels: int = 1) -> Report:
    """Group ``runs`` and compute every group's numbers and its comparison with the baseline group.

    ``baseline`` is a group label; None takes the plan's, else :func:`default_baseline`. ``metric`` overrides the
    plan's primary metric (a departure the report names). ``levels``: the runs are one of this many levels of a
    "when" map, whose comparisons all share the plan's alpha. Raises ValueError for an unknown label or metric.
    """
    grouped = [r for r in runs if r.config is not None]
    groups, warnings, common = group_runs(grouped)
    plan, plan_notes = study_plan(grouped)
    metric = metric or plan.metric
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r} is not a metric; choose from {', '.join(METRICS)}")
    label = baseline or plan.baseline
    if label is None:
        base = default_baseline(groups)
    else:
        base = next((g for g in groups if g.label == label), None)
        if base is None:
            where = "--baseline" if baseline else "the plan's baseline (plan.baseline)"
            raise ValueError(f"{where} {label!r} is not a group; the groups are: "
                             + ", ".join(g.label for g in groups))
    metrics = {g.label: pd.DataFrame([run_metrics(r, plan.late_fraction) for r in g.runs]) for g in groups}
    rows = [summarize_group(g, metrics[g.label], metric) for g in groups]
    base_label = None if base is None else base.label
    effects_against_baseline(rows, metrics, base_label, plan, metric, levels)
    power = power_of(rows, metrics, base_label, plan, metric, levels)
    for g, s in zip(groups, rows):
        if base is not None and g is not base:
            s.update(improvement(metrics[g.label].query("finished"), metrics[base.label].query("finished"), metric))
    unplanned = [] if not plan.recorded else [g.label for g in groups if not any(records(r, plan) for r in g.runs)]
    away = departures(plan, metric, None if base is None else base.label,
                      {s["group"]: s["seeds"] for s in rows}, unplanned)
    return Report(groups, base, label is not None, metrics, pd.DataFrame(rows), warnings,
                  [r for r in runs if r.config is None], common, plan, metric, plan_notes, away, power)
