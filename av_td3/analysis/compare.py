"""``av-td3 compare``: group runs by configuration (seeds pooled), aggregate final evaluation returns with IQM and
bootstrap intervals, report divergence, collapse, gradient spikes and the scale of the gradient norms next to
the clip limits, and write ``comparison.md``, ``comparison.csv`` and ``plots/*.png``.

Runs are grouped by their configuration, not by the folder or sitting they come from: live run folders and
archived runs (``av-td3 archive``) from several machines pool into one group when their configurations match,
keys that never change what is computed aside (:mod:`av_td3.rundir`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from av_td3.analysis import stats
from av_td3.analysis.events import series
from av_td3.analysis.plots import write_plots
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import NETS, judge
from av_td3.config import ClipConfig
from av_td3.rundir import RUN_ONLY_KEYS, flatten, is_experiment_key

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
    ``=1.0`` land in one group); config-group choices (``agent=ddpg``) are kept as written."""
    items = []
    for override in overrides:
        override = override.lstrip("+")
        key = override.partition("=")[0]
        if key in IGNORED_OVERRIDES or key.startswith(("hydra.", "hydra/")):
            continue
        items.append(f"{key}={_value_text(flat[key])}" if key in flat else override)
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
                         "code_version": run.code_version}
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


def binding_notes(s: dict[str, Any]) -> list[str]:
    """Plain words for a clip limit that binds on no update, or on every one (then it normalises)."""
    notes = []
    for net in NETS:
        fraction = s[f"{net}_clip_fraction"]
        if not np.isfinite(fraction) or not np.isfinite(s[f"{net}_clip_limit"]):
            continue
        if fraction <= NEVER_BINDS:
            notes.append(f"the {net}'s limit never binds ({_pct(fraction)} of updates clipped): clipping the "
                         f"{net} changes nothing here")
        elif fraction >= ALWAYS_BINDS:
            notes.append(f"the {net}'s limit binds on {_pct(fraction)} of updates: its clipping acts as gradient "
                         f"normalisation (norm p50 {_num(s[f'{net}_norm_p50'])} vs limit "
                         f"{_num(s[f'{net}_clip_limit_used'])})")
    return notes


# -------------------------------------------------------------------------------------------------- formatting
def _num(x: float, digits: int = 4) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _interval(lo: float, hi: float) -> str:
    return f"[{_num(lo)}, {_num(hi)}]"


def _limit_text(s: dict[str, Any], net: str) -> str:
    limit, mode = s[f"{net}_clip_limit"], s["clip_mode"]
    if mode == "norm":
        return f"limit {_num(limit)}"
    return f"{mode}, limit used ~{_num(s[f'{net}_clip_limit_used'])}"


def _cells(s: dict[str, Any]) -> dict[str, str]:
    n = s["n_return"]
    if n >= 2:
        iqm = f"{_num(s['return_iqm'])} {_interval(s['return_ci_low'], s['return_ci_high'])}"
        mean = f"{_num(s['return_mean'])} ± {_num(s['return_std'])}"
    elif n == 1:
        iqm, mean = f"{_num(s['return_iqm'])} (n=1, no interval)", f"{_num(s['return_mean'])} (n=1)"
    else:
        iqm, mean = "no finished run with a return", "-"
    runs = f"{s['runs']} ({s['completed']} completed / {s['stopped']} stopped"
    runs += f", {s['incomplete']} incomplete)" if s["incomplete"] else ")"
    cells = {"group": f"`{s['group']}`", "runs": runs, "return IQM [95% CI]": iqm, "return mean ± std": mean,
             "success": _pct(s["success_rate"]), "collisions/ep": _num(s["collisions"], 3)}
    for net in NETS:
        limit, top = s[f"{net}_clip_limit"], _num(s[f"{net}_after_clip_max"])
        if not np.isfinite(s[f"{net}_clip_fraction"]) and not np.isfinite(s[f"{net}_after_clip_max"]):
            cells[f"{net} clipping"] = "no gradients logged"  # e.g. agent=pid: nothing is learned
            cells[f"{net} norm p50/p90/p99"] = "-"
            cells[f"{net} spikes /1k upd."] = "-"
            continue
        cells[f"{net} clipping"] = (f"unclipped, max norm {top}" if not np.isfinite(limit) else
                                    f"{_pct(s[f'{net}_clip_fraction'])} clipped ({_limit_text(s, net)})")
        cells[f"{net} norm p50/p90/p99"] = "/".join(_num(s[f"{net}_norm_p{q}"], 3) for q in NORM_PERCENTILES)
        cells[f"{net} spikes /1k upd."] = _num(s[f"{net}_spikes_per_1k"], 2)
    finished = s["runs"] - s["incomplete"]
    cells["diverged"] = f"{s['diverged']}/{finished}"
    cells["collapsed"] = f"{s['collapsed']}/{finished}"
    cells["wall h/run"] = _num(s["wall_h_mean"], 2)
    if s["is_baseline"]:
        cells["P(> baseline)"] = "baseline"
    elif not np.isfinite(s["p_improvement"]):
        cells["P(> baseline)"] = "-"
    else:
        how = "paired by seed" if s["paired"] else "unpaired"
        interval = (f"[{s['p_ci_low']:.2f}, {s['p_ci_high']:.2f}]" if np.isfinite(s["p_ci_low"])
                    else "(n=1, no interval)")
        cells["P(> baseline)"] = f"{s['p_improvement']:.2f} {interval} {how}"
        if s["n_return"] < MIN_RUNS_FOR_VERDICT or s["n_base"] < MIN_RUNS_FOR_VERDICT:
            cells["P(> baseline)"] += f" (n={min(s['n_return'], s['n_base'])}: no conclusion)"
    return cells


def verdict_line(s: dict[str, Any], baseline: str | None) -> str:
    """One sentence per group against the baseline, read off P(improvement)'s interval."""
    head = f"`{s['group']}`: return IQM {_num(s['return_iqm'])} (n={s['n_return']})"
    if s["is_baseline"]:
        return f"{head}: the baseline"
    if baseline is None or not np.isfinite(s["p_improvement"]):
        return f"{head}: no baseline to compare with"
    n = min(s["n_return"], s["n_base"])
    if n < MIN_RUNS_FOR_VERDICT:
        return f"{head}: n={n} against `{baseline}`, no conclusion (run at least {MIN_RUNS_FOR_VERDICT} seeds each)"
    lo, hi = s["p_ci_low"], s["p_ci_high"]
    p = f"P(> baseline) {s['p_improvement']:.2f} [{lo:.2f}, {hi:.2f}]"
    if lo > 0.5:
        return f"{head}: better than `{baseline}` ({p})"
    if hi < 0.5:
        return f"{head}: worse than `{baseline}` ({p})"
    return f"{head}: no clear difference from `{baseline}` ({p}, the interval spans 0.5)"


def identical_groups(summary_rows: list[dict[str, Any]]) -> list[str]:
    """Pairs of groups whose runs ended with exactly the same final return for every seed: usually a setting
    that never takes effect (a clip limit that never binds)."""
    notes = []
    seen: dict[str, str] = {}
    for s in summary_rows:
        key = s["returns_by_seed"]
        if not key:
            continue
        if key in seen:
            notes.append(f"`{s['group']}` and `{seen[key]}` have identical final returns on every seed "
                         f"({key}): what tells them apart did not change the runs")
        else:
            seen[key] = s["group"]
    return notes


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r[h].replace("|", "\\|") for h in header) + " |" for r in rows]
    return "\n".join(lines)


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
    rows = []
    n_base = 0 if base is None else int(metrics[base.label].query("finished")["return"].notna().sum())
    for g in groups:
        s = summarize_group(g, metrics[g.label])
        s["is_baseline"] = g is base
        s["n_base"] = n_base
        if base is None or g is base:
            s.update(p_improvement=NAN, p_ci_low=NAN, p_ci_high=NAN, paired=False)
        else:
            s.update(improvement(metrics[g.label].query("finished"), metrics[base.label].query("finished")))
        rows.append(s)
    return Report(groups, base, baseline is not None, metrics, pd.DataFrame(rows), warnings,
                   [r for r in runs if r.config is None], common)


def _left_out_line(m: dict[str, Any]) -> str:
    line = f"- {m['run']}: {m['state']}"
    if pd.notna(m["steps"]):
        line += f" at step {int(m['steps'])}" + (f" of {int(m['total_steps'])}" if pd.notna(m["total_steps"]) else "")
    return line + (f" ({m['reason']})" if pd.notna(m["reason"]) else "")


def notes(summary: Report) -> list[str]:
    """What a reader must know before reading the table: warnings, limits that never or always bind, groups
    that are identical."""
    rows = summary.table.to_dict("records")
    out = list(summary.warnings)
    out += [f"`{s['group']}`: {note}" for s in rows for note in binding_notes(s)]
    out += identical_groups(rows)
    return out


def verdicts(summary: Report) -> list[str]:
    base = None if summary.baseline is None else summary.baseline.label
    return [verdict_line(s, base) for s in summary.table.to_dict("records")]


def markdown_report(summary: Report, plots: list[Path]) -> str:
    """comparison.md: the table, what its columns mean, verdicts, divergence and collapse (each run with its
    rule and step), alerts, left-out runs, notes and warnings, plots."""
    rows = summary.table.to_dict("records")
    n_runs = sum(len(g.runs) for g in summary.groups)
    md = [f"# Comparison: {n_runs} run(s) in {len(summary.groups)} group(s)", ""]
    if summary.baseline is None:
        md.append("Baseline: none (no group clips at the default limits; pick one with --baseline)")
    else:
        why = "chosen with --baseline" if summary.chosen else "clipping at the default limits"
        md.append(f"Baseline: `{summary.baseline.label}` ({why})")
    if summary.common:
        md += ["", f"Every run: `{' '.join(summary.common)}` (left out of the group names)"]
    md += ["", "Final evaluation return: interquartile mean (IQM) with a 95% percentile-bootstrap interval over "
           f"runs ({stats.REPS} resamples), and mean ± std. Statistics use finished runs (completed or stopped). "
           "P(> baseline): probability that a run of the group scores a higher final return than a baseline run "
           "(ties count half), with a 95% bootstrap interval. Clipping: share of updates clipped and the limit "
           "(for the adaptive modes the median limit used). Norm p50/p90/p99: percentiles of the before-clip "
           "global gradient norm within each logging interval, median over the run's intervals and the group's "
           "runs. Spikes: updates whose before-clip norm jumped more than monitor.spike_z std above its running "
           "log-mean, per 1,000 updates. Diverged: numerical failure only (NaN guard, a non-finite logged value, "
           "|Q| beyond the reward bound). Collapsed: the final evaluation lost more than "
           "monitor.collapse_fraction of the gain of the run's best evaluation over its first.", "",
           markdown_table([_cells(s) for s in rows]), ""]
    md += ["## Verdicts", ""] + [f"- {line}" for line in verdicts(summary)]
    md += ["", "## Divergence and collapse", ""]
    flagged = [m for df in summary.metrics.values() for m in df.to_dict("records")
               if m["finished"] and (m["diverged"] or m["collapsed"])]
    md += [f"- {m['run']}: diverged: {m['diverged_why']}" for m in flagged if m["diverged"]]
    md += [f"- {m['run']}: collapsed: {m['collapsed_why']}" for m in flagged if m["collapsed"]]
    if not flagged:
        md.append("- none: no run diverged or collapsed")
    md += ["", "## Alerts fired (flushes where each alert fired, summed over the group's runs)", ""]
    md += [f"- `{s['group']}`: {s['alerts_by_name'] or 'none'}" for s in rows]
    left_out = [m for df in summary.metrics.values() for m in df.to_dict("records") if not m["finished"]]
    md += ["", "## Runs left out of the statistics (crashed, failed or still running)", ""]
    md += [_left_out_line(m) for m in left_out]
    md += [f"- {r.name}: no .hydra/config.yaml, cannot be grouped" for r in summary.ungrouped]
    if not left_out and not summary.ungrouped:
        md.append("- none")
    found = notes(summary)
    if found:
        md += ["", "## Notes and warnings", ""] + [f"- {w}" for w in found]
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(md) + "\n"


@dataclass
class Comparison:
    summary: Report
    table: str          # the markdown table (printed by the CLI)
    markdown: str       # all of comparison.md
    plots: list[Path]


def compare(runs: list[Run], out: Path, baseline: str | None = None) -> Comparison:
    """Summarize ``runs`` and write ``comparison.md``, ``comparison.csv`` and ``plots/*.png`` into ``out``."""
    summary = summarize(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots({g.label: [r for r in g.runs if r.finished] for g in summary.groups}, out / "plots")
    summary.table.to_csv(out / "comparison.csv", index=False)
    markdown = markdown_report(summary, plots)
    (out / "comparison.md").write_text(markdown)
    table = markdown_table([_cells(s) for s in summary.table.to_dict("records")])
    return Comparison(summary, table, markdown, plots)
