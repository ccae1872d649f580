"""``av-td3 compare``: group runs by configuration (seeds pooled), aggregate final evaluation returns with IQM and
bootstrap intervals, report divergence as a result in its own right, and write ``comparison.md``,
``comparison.csv`` and ``plots/*.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from av_td3.analysis import stats
from av_td3.analysis.events import series
from av_td3.analysis.plots import write_plots
from av_td3.analysis.runs import Run
from av_td3.analysis.validate import CRITICAL_ALERTS, NETS
from av_td3.config import ClipConfig
from av_td3.sweep import RUN_ONLY_KEYS

# Overrides that leave the experiment unchanged, so runs differing only in these belong together: presets,
# keys that change how a job runs but not what it computes, and the seed (pooled by the statistics).
IGNORED_OVERRIDES = frozenset({"seed", "experiment", "debug", "launcher", "hydra/launcher", "hparams_search"}
                              | RUN_ONLY_KEYS)
# Config keys that never make two runs different experiments (used for runs without overrides.yaml).
IGNORED_CONFIG_KEYS = frozenset({"seed", "trainer.device", "experiment_name"} | RUN_ONLY_KEYS)
IGNORED_CONFIG_PREFIXES = ("logger.",)
EVAL_FIELDS = ("return", "success_rate", "collisions", "lane_invasions")
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------- grouping
@dataclass
class Group:
    label: str         # "default" or "key=value,key=value"
    items: list[str]   # the label's key=value parts (fewer = closer to the defaults)
    runs: list[Run]


def _flatten(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def _value_text(value: Any) -> str:
    return "null" if value is None else str(value)


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


def _relevant(key: str) -> bool:
    return key not in IGNORED_CONFIG_KEYS and not key.startswith(IGNORED_CONFIG_PREFIXES)


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str], list[str]]:
    """Group runs (each with a config) by their overrides minus the seed and minus overrides that do not change
    the experiment; runs without overrides.yaml are labelled by the config keys that differ between the runs.

    Returns the groups sorted by label, a warning for each group whose runs' configs differ in more than the
    seed (e.g. a smoke sweep pooled with a full one, since ``debug=`` is not part of the label), and the
    overrides every run shares (``python launch.py -m experiment=X agent.encoder=shared``): those are left out
    of the labels, so ``arm=td3`` stays ``arm=td3`` whatever else the sweep's command line set.
    """
    flats = [_flatten(r.config) for r in runs]  # type: ignore[arg-type]
    keys = sorted({k for f in flats for k in f if _relevant(k)})
    varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    run_items = [_override_items(run.overrides, flat) if run.overrides is not None
                 else [f"{k}={_value_text(flat.get(k))}" for k in varying] for run, flat in zip(runs, flats)]
    common: list[str] = []
    if len({tuple(items) for items in run_items}) > 1:
        common = sorted(set.intersection(*(set(items) for items in run_items)))
        run_items = [[i for i in items if i not in common] for items in run_items]
    groups: dict[str, Group] = {}
    members: dict[str, list[dict[str, Any]]] = {}
    for run, flat, items in zip(runs, flats, run_items):
        label = ",".join(items) or "default"
        groups.setdefault(label, Group(label, items, [])).runs.append(run)
        members.setdefault(label, []).append(flat)
    warnings = []
    for label, group_flats in members.items():
        mixed = [k for k in varying if len({repr(f.get(k)) for f in group_flats}) > 1]
        if mixed:
            warnings.append(f"group `{label}` pools runs whose configs differ in: {', '.join(mixed)}")
    return [groups[k] for k in sorted(groups)], warnings, common


def default_baseline(groups: list[Group]) -> Group | None:
    """The group clipping both networks at the schema's default limits (the fewest overrides if several)."""
    clip = ClipConfig()
    candidates = [g for g in groups if all(r.config.agent.clip.actor == clip.actor  # type: ignore[union-attr]
                                           and r.config.agent.clip.critic == clip.critic  # type: ignore[union-attr]
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
    m: dict[str, Any] = {"run": run.name, "state": run.state, "finished": run.finished, "seed": run.seed,
                         "steps": summary.get("steps"), "total_steps": summary.get("total_steps"),
                         "reason": summary.get("reason")}
    for name in EVAL_FIELDS:
        value = final_eval.get(name)
        m[name] = float(value) if value is not None else _last(df, f"eval/{name}")
    for net in NETS:
        fraction = series(df, f"grad/{net}/clip_fraction")
        after = series(df, f"grad/{net}/total/after_clip_max")
        m[f"{net}_clip_fraction"] = float(fraction.mean()) if len(fraction) else NAN
        m[f"{net}_after_clip_max"] = float(after.max()) if len(after) else NAN
    m["alerts"] = {k: int(v) for k, v in (summary.get("alerts") or {}).items() if v}
    m["nan_guard"] = bool((summary.get("nan_guard") or {}).get("triggered"))
    critical = df["tag"].str.fullmatch(rf"alert/[^/]+/(?:{'|'.join(CRITICAL_ALERTS)})")
    m["critical"] = bool(summary.get("critical_alerts")) or bool((df.loc[critical, "value"] > 0).any())
    m["diverged"] = m["nan_guard"] or m["critical"]
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
    }
    if len(returns) >= 2:
        s["return_ci_low"], s["return_ci_high"] = stats.iqm_ci(returns)
    for name in EVAL_FIELDS[1:]:
        s[name] = float(fin[name].mean()) if fin[name].notna().any() else NAN
    for net in NETS:
        limit = cfg.agent.clip[net]  # type: ignore[union-attr]
        s[f"{net}_clip_limit"] = NAN if limit is None else float(limit)
        s[f"{net}_clip_fraction"] = float(fin[f"{net}_clip_fraction"].mean()) if len(fin) else NAN
        s[f"{net}_after_clip_max"] = float(fin[f"{net}_after_clip_max"].max()) if len(fin) else NAN
    alerts: dict[str, int] = {}
    for run_alerts in fin["alerts"]:
        for name, count in run_alerts.items():
            alerts[name] = alerts.get(name, 0) + count
    s["alerts"] = sum(alerts.values())
    s["alerts_by_name"] = "; ".join(f"{k}: {v}" for k, v in sorted(alerts.items()))
    s["critical_alert_runs"] = int(fin["critical"].sum())
    s["nan_guard_stops"] = int(fin["nan_guard"].sum())
    s["diverged"] = int(fin["diverged"].sum())
    s["divergence_rate"] = s["diverged"] / len(fin) if len(fin) else NAN
    return s


# -------------------------------------------------------------------------------------------------- formatting
def _num(x: float, digits: int = 4) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _interval(lo: float, hi: float) -> str:
    return f"[{_num(lo)}, {_num(hi)}]"


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
             "success": _pct(s["success_rate"]), "collisions/ep": _num(s["collisions"], 3),
             "lane inv./ep": _num(s["lane_invasions"], 3)}
    for net in NETS:
        limit, top = s[f"{net}_clip_limit"], _num(s[f"{net}_after_clip_max"])
        if not np.isfinite(s[f"{net}_clip_fraction"]) and not np.isfinite(s[f"{net}_after_clip_max"]):
            cells[f"{net} clipping"] = "no gradients logged"  # e.g. agent=pid: nothing is learned
            continue
        cells[f"{net} clipping"] = (f"unclipped, max norm {top}" if not np.isfinite(limit) else
                                    f"{_pct(s[f'{net}_clip_fraction'])} clipped, max {top} (limit {_num(limit)})")
    finished = s["runs"] - s["incomplete"]
    cells["alerts fired"] = f"{s['alerts']}"
    cells["NaN-guard stops"] = f"{s['nan_guard_stops']}"
    cells["diverged"] = f"{s['diverged']}/{finished} ({_pct(s['divergence_rate'])})"
    if s["is_baseline"]:
        cells["P(> baseline)"] = "baseline"
    elif not np.isfinite(s["p_improvement"]):
        cells["P(> baseline)"] = "-"
    else:
        how = "paired by seed" if s["paired"] else "unpaired"
        interval = (f"[{s['p_ci_low']:.2f}, {s['p_ci_high']:.2f}]" if np.isfinite(s["p_ci_low"])
                    else "(n=1, no interval)")
        cells["P(> baseline)"] = f"{s['p_improvement']:.2f} {interval} {how}"
    return cells


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r[h].replace("|", "\\|") for h in header) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
@dataclass
class Summary:
    groups: list[Group]
    baseline: Group | None
    chosen: bool                        # the baseline was named with --baseline
    metrics: dict[str, pd.DataFrame]    # per group label: one row of run_metrics per run
    table: pd.DataFrame                 # per group: the numbers of comparison.csv
    warnings: list[str]
    ungrouped: list[Run]                # runs without a config (bare event files)
    common: list[str]                   # overrides every run shares, left out of the group labels


def summarize(runs: list[Run], baseline: str | None = None) -> Summary:
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
    for g in groups:
        s = summarize_group(g, metrics[g.label])
        s["is_baseline"] = g is base
        if base is None or g is base:
            s.update(p_improvement=NAN, p_ci_low=NAN, p_ci_high=NAN, paired=False)
        else:
            s.update(improvement(metrics[g.label].query("finished"), metrics[base.label].query("finished")))
        rows.append(s)
    return Summary(groups, base, baseline is not None, metrics, pd.DataFrame(rows), warnings,
                   [r for r in runs if r.config is None], common)


def _left_out_line(m: dict[str, Any]) -> str:
    line = f"- {m['run']}: {m['state']}"
    if pd.notna(m["steps"]):
        line += f" at step {int(m['steps'])}" + (f" of {int(m['total_steps'])}" if pd.notna(m["total_steps"]) else "")
    return line + (f" ({m['reason']})" if pd.notna(m["reason"]) else "")


def markdown_report(summary: Summary, plots: list[Path]) -> str:
    """comparison.md: the table, what its columns mean, divergence, alerts, left-out runs, warnings, plots."""
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
           "(ties count half), with a 95% bootstrap interval. Diverged: runs stopped by the NaN guard or with "
           "critical alerts, out of the finished runs.", "", markdown_table([_cells(s) for s in rows]), ""]
    md += ["## Divergence", ""]
    md += [f"- `{s['group']}`: {s['diverged']} of {s['runs'] - s['incomplete']} finished run(s) diverged "
           f"({_pct(s['divergence_rate'])}): {s['nan_guard_stops']} stopped by the NaN guard, "
           f"{s['critical_alert_runs']} with critical alerts" for s in rows]
    md += ["", "## Alerts fired (flushes where each alert fired, summed over the group's runs)", ""]
    md += [f"- `{s['group']}`: {s['alerts_by_name'] or 'none'}" for s in rows]
    left_out = [m for df in summary.metrics.values() for m in df.to_dict("records") if not m["finished"]]
    md += ["", "## Runs left out of the statistics (crashed, failed or still running)", ""]
    md += [_left_out_line(m) for m in left_out]
    md += [f"- {r.name}: no .hydra/config.yaml, cannot be grouped" for r in summary.ungrouped]
    if not left_out and not summary.ungrouped:
        md.append("- none")
    if summary.warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in summary.warnings]
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(md) + "\n"


@dataclass
class Comparison:
    summary: Summary
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
