"""``av-td3 compare``, the numbers: group runs by configuration (seeds pooled), aggregate final evaluation returns
with IQM and bootstrap intervals, the comparison with a baseline group, divergence, collapse, gradient spikes
and the scale of the gradient norms next to the clip limits. :mod:`av_td3.analysis.report` puts them into
words, tables and plots (``comparison.md``, ``comparison.csv``, ``plots/*.png``).

Runs are grouped by their configuration, not by the folder or sitting they come from: live run folders and
archived runs (``av-td3 archive``) from several machines pool into one group when their configurations match,
keys that never change what is computed aside (:mod:`av_td3.rundir`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from av_td3.analysis import stats
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import NETS, judge
from av_td3.config import ClipConfig
from av_td3.rundir import DEFAULTS_CHANGED, RUN_ONLY_KEYS, flatten, is_experiment_key, schema_default

# Overrides that leave the experiment unchanged, so runs differing only in these belong together: presets,
# keys that change how a job runs but not what it computes, and the seed (pooled by the statistics).
IGNORED_OVERRIDES = frozenset({"seed", "experiment", "debug", "launcher", "hydra/launcher", "hparams_search"}
                              | RUN_ONLY_KEYS)
EVAL_FIELDS = ("return", "success_rate", "collisions", "lane_invasions")
NORM_PERCENTILES = (50, 90, 99)
# A limit that binds on at most / at least this share of updates "never binds" / "binds on every update".
NEVER_BINDS, ALWAYS_BINDS = 0.001, 0.99
MIN_RUNS_FOR_VERDICT = 3
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
        if key in IGNORED_OVERRIDES or key.startswith(("hydra.", "hydra/")):
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
    flats = [flatten(r.config) for r in runs]  # type: ignore[arg-type]
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
        items = next((t for t in ranked if t not in unanimous or len(ranked) == 1), ranked[0])
        if len(ranked) > 1:
            shown = sorted({",".join(t) or "default" for t in labels})
            warnings.append(f"group `{','.join(items) or 'default'}` pools runs launched as {', '.join(shown)}: "
                            "their configurations are the same")
        named.append((list(items), members))
    # Runs launched under one label whose configurations differ (debug=smoke is not a label item): split, named.
    by_label: dict[str, list[int]] = {}
    for n, (items, _) in enumerate(named):
        by_label.setdefault(",".join(items), []).append(n)
    for label, clashing in by_label.items():
        if len(clashing) < 2:
            continue
        differ = [k for k in varying if len({repr(flats[named[n][1][0]].get(k)) for n in clashing}) > 1]
        for n in clashing:
            flat = flats[named[n][1][0]]
            named[n] = (named[n][0] + [f"[{k}={_value_text(flat.get(k))}]" for k in differ], named[n][1])
        warnings.append(f"runs launched as `{label or 'default'}` differ in their configs ({', '.join(differ)}): "
                        f"split into {len(clashing)} groups")
    groups = {}
    for items, members in named:
        label = ",".join(items) or "default"
        group = groups[label] = Group(label, items, [runs[i] for i in members])
        versions = sorted({r.code_version for r in group.runs if r.code_version})
        if len(versions) > 1:
            warnings.append(f"group `{label}` pools runs from {len(versions)} code versions: {', '.join(versions)}")
        seeds = [r.seed for r in group.runs]
        twice = sorted({s for s in seeds if seeds.count(s) > 1 and s is not None})
        if twice:
            warnings.append(f"group `{label}` holds seed(s) {', '.join(map(str, twice))} more than once (the same "
                            "run archived twice, or rerun): each counts as a run")
    return [groups[k] for k in sorted(groups)], warnings, common


def default_baseline(groups: list[Group]) -> Group | None:
    """The group clipping both networks at the schema's default limits (the fewest overrides if several)."""
    clip = ClipConfig()
    candidates = [g for g in groups if all(r.config.agent.clip.actor == clip.actor  # type: ignore[union-attr]
                                           and r.config.agent.clip.critic == clip.critic  # type: ignore[union-attr]
                                           and r.config.agent.clip.mode == clip.mode  # type: ignore[union-attr]
                                           for r in g.runs)]
    return min(candidates, key=lambda g: (len(g.items), g.label), default=None)


# ----------------------------------------------------------------------------------------------------- metrics
def _last(df: pd.DataFrame, tag: str) -> float:
    s = series(df, tag)
    return float(s.iloc[-1]) if len(s) else NAN


def run_metrics(run: Run) -> dict[str, Any]:
    """One run's numbers for the comparison (NaN where the run never logged the quantity)."""
    df = run.scalars
    summary = run.summary or {}
    final_eval = summary.get("final_eval") or {}
    verdict = judge(run)
    m: dict[str, Any] = {"run": run.name, "state": run.state, "finished": run.finished, "seed": run.seed,
                         "steps": summary.get("steps"), "total_steps": summary.get("total_steps"),
                         "reason": summary.get("reason"), "wall_s": summary.get("wall_s"),
                         "code_version": run.code_version,
                         "machine": (summary.get("provenance") or {}).get("machine")}
    for name in EVAL_FIELDS:
        value = final_eval.get(name)
        m[name] = float(value) if value is not None else _last(df, f"eval/{name}")
    for net in NETS:
        fraction = series(df, f"grad/{net}/clip_fraction")
        after = series(df, f"grad/{net}/total/after_clip_max")
        limit = series(df, f"grad/{net}/clip_limit")
        m[f"{net}_clip_fraction"] = float(fraction.mean()) if len(fraction) else NAN
        m[f"{net}_after_clip_max"] = float(after.max()) if len(after) else NAN
        m[f"{net}_clip_limit_used"] = float(limit.median()) if len(limit) else NAN
        for q in NORM_PERCENTILES:  # the median over the run's logging intervals of each interval's percentile
            pct = series(df, f"grad/{net}/total/before_clip_p{q}")
            m[f"{net}_norm_p{q}"] = float(pct.median()) if len(pct) else NAN
        spikes, updates = verdict.spikes.get(net, (NAN, NAN))
        m[f"{net}_spikes"], m[f"{net}_spike_updates"] = spikes, updates
    m["alerts"] = {k: int(v) for k, v in (summary.get("alerts") or {}).items() if v}
    m["nan_guard"] = bool((summary.get("nan_guard") or {}).get("triggered"))
    m["diverged"] = verdict.diverged is not None
    m["diverged_why"] = verdict.diverged
    m["collapsed"] = verdict.collapsed is not None
    m["collapsed_why"] = verdict.collapsed
    return m


def _seed_returns(rows: pd.DataFrame) -> pd.Series:
    return rows.dropna(subset=["return"]).set_index("seed")["return"]


def improvement(rows: pd.DataFrame, base: pd.DataFrame) -> dict[str, Any]:
    """P(a run of one group beats a baseline run) with its interval; runs are paired by seed when both groups
    have exactly the same seeds, each once."""
    x, y = _seed_returns(rows), _seed_returns(base)
    paired = (len(x) > 0 and x.index.is_unique and y.index.is_unique
              and set(x.index) == set(y.index))
    if paired:
        y = y.loc[x.index]
    out = {"p_improvement": NAN, "p_ci_low": NAN, "p_ci_high": NAN, "paired": paired}
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


def summarize_group(group: Group, rows: pd.DataFrame) -> dict[str, Any]:
    """One group's row of comparison.csv (without the comparison to the baseline); ``rows``: its runs' metrics."""
    fin = rows[rows["finished"]]
    returns = fin["return"].dropna().to_numpy()
    cfg = group.runs[0].config
    s: dict[str, Any] = {
        "group": group.label, "runs": len(rows), "completed": int((rows["state"] == "completed").sum()),
        "stopped": int((rows["state"] == "stopped").sum()), "incomplete": int((~rows["finished"]).sum()),
        "n_return": len(returns),
        "return_iqm": stats.iqm(returns) if len(returns) else NAN,
        "return_ci_low": NAN, "return_ci_high": NAN,
        "return_mean": float(np.mean(returns)) if len(returns) else NAN,
        "return_std": float(np.std(returns, ddof=1)) if len(returns) >= 2 else NAN,
        "returns_by_seed": "; ".join(f"{int(sd)}: {r:.4g}" for sd, r in zip(fin["seed"], fin["return"])
                                     if pd.notna(sd) and pd.notna(r)),
        "wall_h_mean": float(fin["wall_s"].dropna().mean() / 3600) if fin["wall_s"].notna().any() else NAN,
        "clip_mode": str(cfg.agent.clip.mode),  # type: ignore[union-attr]
        # the machines its finished runs recorded (summary.json provenance; runs before the record: "not recorded")
        "machines": "; ".join(sorted({m if isinstance(m, str) else "not recorded" for m in fin["machine"]})),
    }
    if len(returns) >= 2:
        s["return_ci_low"], s["return_ci_high"] = stats.iqm_ci(returns)
    for name in EVAL_FIELDS[1:]:
        s[name] = float(fin[name].mean()) if fin[name].notna().any() else NAN
    for net in NETS:
        limit = cfg.agent.clip[net]  # type: ignore[union-attr]
        s[f"{net}_clip_limit"] = NAN if limit is None else float(limit)
        s[f"{net}_clip_limit_used"] = _median(fin[f"{net}_clip_limit_used"])
        s[f"{net}_clip_fraction"] = float(fin[f"{net}_clip_fraction"].mean()) if len(fin) else NAN
        s[f"{net}_after_clip_max"] = float(fin[f"{net}_after_clip_max"].max()) if len(fin) else NAN
        for q in NORM_PERCENTILES:
            s[f"{net}_norm_p{q}"] = _median(fin[f"{net}_norm_p{q}"])
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
    s["diverged"] = int(fin["diverged"].sum())
    s["divergence_rate"] = s["diverged"] / len(fin) if len(fin) else NAN
    s["collapsed"] = int(fin["collapsed"].sum())
    s["collapse_rate"] = s["collapsed"] / len(fin) if len(fin) else NAN
    return s


# ------------------------------------------------------------------------------------------------------- main
@dataclass
class Report:
    groups: list[Group]
    baseline: Group | None
    chosen: bool                        # the baseline was named with --baseline
    metrics: dict[str, pd.DataFrame]    # per group label: one row of run_metrics per run
    table: pd.DataFrame                 # per group: the numbers of comparison.csv
    warnings: list[str]
    ungrouped: list[Run]                # runs without a config (bare event files)
    common: list[str]                   # overrides every run shares, left out of the group labels


def summarize(runs: list[Run], baseline: str | None = None) -> Report:
    """Group ``runs`` and compute every group's numbers and its comparison with the baseline group.

    ``baseline`` is a group label; None picks :func:`default_baseline`. Raises ValueError for an unknown label.
    """
    groups, warnings, common = group_runs([r for r in runs if r.config is not None])
    if baseline is None:
        base = default_baseline(groups)
    else:
        base = next((g for g in groups if g.label == baseline), None)
        if base is None:
            raise ValueError(f"--baseline {baseline!r} is not a group; the groups are: "
                             + ", ".join(g.label for g in groups))
    metrics = {g.label: pd.DataFrame([run_metrics(r) for r in g.runs]) for g in groups}
    rows = [summarize_group(g, metrics[g.label]) for g in groups]
    n_base = 0 if base is None else int(metrics[base.label].query("finished")["return"].notna().sum())
    base_iqm = NAN if base is None else rows[groups.index(base)]["return_iqm"]
    for g, s in zip(groups, rows):
        s["is_baseline"] = g is base
        s["n_base"] = n_base
        # the group's IQM and its interval as shares of the baseline's IQM (the baseline's own spread is not in
        # the interval): how targets such as "80% of PID" are stated
        s["return_vs_baseline"], s["return_vs_baseline_low"], s["return_vs_baseline_high"] = (
            (s[k] / base_iqm if np.isfinite(base_iqm) and base_iqm > 0 else NAN)
            for k in ("return_iqm", "return_ci_low", "return_ci_high"))
        if base is None or g is base:
            s.update(p_improvement=NAN, p_ci_low=NAN, p_ci_high=NAN, paired=False)
        else:
            s.update(improvement(metrics[g.label].query("finished"), metrics[base.label].query("finished")))
    return Report(groups, base, baseline is not None, metrics, pd.DataFrame(rows), warnings,
                   [r for r in runs if r.config is None], common)
