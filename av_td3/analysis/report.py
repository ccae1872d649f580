"""``av-td3 compare``, the report: the numbers of :mod:`av_td3.analysis.compare` as ``comparison.md`` (the plan and
its departures, table, what its columns mean, power, verdicts, run verdicts with their rules, alerts, left-out
runs, notes and warnings, plots), ``comparison.csv`` and ``plots/*.png``; the CLI prints the plan, the table,
power, verdicts and notes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from av_td3.analysis import stats
from av_td3.analysis.compare import ALWAYS_BINDS, MIN_RUNS_FOR_VERDICT, NEVER_BINDS, Report, summarize
from av_td3.analysis.metrics import METRICS, NET_COLUMNS
from av_td3.analysis.metrics import num as _num
from av_td3.analysis.metrics import pct as _pct
from av_td3.analysis.plots import plot_effects, write_plots
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import RULES, RULES_VERSION
from av_td3.rundir import STOPPED, schema_default
from av_td3.tags import NETS


# ------------------------------------------------------------------------------------------------------ words
def binding_notes(s: dict[str, Any]) -> list[str]:
    """Plain words for a clip limit that binds on no update, or on every one (then it normalises)."""
    notes = []
    for net in NETS:
        fraction = s[f"{net}_clip_fraction"]
        if not np.isfinite(fraction) or not np.isfinite(s[f"{net}_clip_limit"]):
            continue
        what = "units" if s["clip_mode"] == "agc" else "updates"  # AGC clips unit by unit
        if fraction <= NEVER_BINDS:
            notes.append(f"the {net}'s limit never binds ({_pct(fraction)} of {what} clipped): clipping the "
                         f"{net} changes nothing here")
        elif s["clip_mode"] == "agc":
            if fraction >= ALWAYS_BINDS:
                notes.append(f"AGC clips {_pct(fraction)} of the {net}'s units: it rescales nearly every unit's "
                             "gradient to lambda x its weight norm")
        elif fraction >= ALWAYS_BINDS:
            notes.append(f"the {net}'s limit binds on {_pct(fraction)} of updates: its clipping acts as gradient "
                         f"normalisation (norm p50 {_num(s[f'{net}_norm_p50'])} vs limit "
                         f"{_num(s[f'{net}_clip_limit_used'])})")
    return notes



# -------------------------------------------------------------------------------------------------- formatting
def _metric_cell(s: dict[str, Any], percent: bool) -> str:
    fmt = _pct if percent else _num
    if s["n"] >= 2:
        return f"{fmt(s['mean'])} [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]"
    if s["n"] == 1:
        return f"{fmt(s['mean'])} (n=1, no interval)"
    return "no finished run with it"


def _effect_cell(s: dict[str, Any]) -> str:
    if s["is_baseline"]:
        return "baseline"
    if not np.isfinite(s["effect"]):
        return "-"
    if np.isfinite(s["effect_pct"]):
        low, high = _signed_pct(s["effect_pct_low"]), _signed_pct(s["effect_pct_high"])
        return f"{_signed_pct(s['effect_pct'])} [{low}, {high}]"
    return f"{s['effect']:+.4g} [{s['effect_low']:+.4g}, {s['effect_high']:+.4g}]"


def _signed_pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:+.0f}%"


def _cells(s: dict[str, Any]) -> dict[str, str]:
    metric = METRICS[s["metric"]]
    runs = f"{s['runs']} ({s['completed']} completed / {s['stopped']} stopped"
    runs += f", {s['incomplete']} incomplete)" if s["incomplete"] else ")"
    cells = {"group": f"`{s['group']}`", "runs": runs, "steps/run": f"{s['total_steps']:,}",
             f"{metric.title} mean [95% CI]": _metric_cell(s, metric.percent),
             "CV": _pct(s["cv"]),
             "effect vs baseline [adj. CI]": _effect_cell(s),
             "verdict": "baseline" if s["is_baseline"] else (s["verdict"] or "-")}
    cells.update({m.title: m.show(s[f"{m.name}_mean"]) for m in METRICS.values() if m.column})
    for net in NETS:
        # no gradients logged, e.g. agent=pid: nothing is learned
        logged = np.isfinite(s[f"{net}_clip_fraction"]) or np.isfinite(s[f"{net}_after_clip_max"])
        for column in NET_COLUMNS:
            cells[f"{net} {column.title}"] = column.cell(s, net) if logged else column.missing
    for verdict, title in (("diverged", "diverged"), ("collapsed", "collapsed"), ("failed", "failed to learn")):
        cells[title] = f"{s[verdict]}/{s['finished']}"
    cells["wall h/run"] = _num(s["wall_h_mean"], 2)
    return cells


def power_lines(summary: Report) -> list[str]:
    """What these runs can detect, and how many a plan's smallest effect of interest needs."""
    pw, plan = summary.power, summary.plan
    if pw is None:
        return ["no baseline: no effects, no power"]
    if not np.isfinite(pw.sd) or not np.isfinite(pw.base_mean):
        return [f"{summary.metric}: too few runs with the metric to estimate its spread"]
    unit = f"{pw.sd / pw.base_mean:.1%} of the baseline's mean {_num(pw.base_mean)}" if pw.base_mean > 0 else \
        f"the baseline's mean is {_num(pw.base_mean)}"
    lines = [f"within-group SD of {summary.metric}, pooled over the groups: {_num(pw.sd)} ({unit})"]
    shown = (f"{pw.detectable_share:.0%} of the baseline" if pw.base_mean > 0 and np.isfinite(pw.detectable) else
             "(not computable: the power solver found no solution)" if not np.isfinite(pw.detectable) else
             f"a difference of {_num(pw.detectable)} (in {summary.metric}'s units: the baseline's mean is not "
             f"positive, so no share of it)")
    lines.append(f"with n={pw.n} per group and {pw.comparisons} comparison(s) with the baseline (alpha "
                 f"{plan.alpha:g} / {pw.comparisons} = {pw.alpha:.3g} each, two-sided), these runs detect a "
                 f"difference with {plan.power:.0%} power only from {shown}" if pw.n >= 2 else
                 "fewer than 2 runs per group: nothing can be detected")
    if pw.runs_for_effect > 0:
        lines.append(f"the plan's smallest effect of interest, ±{plan.effect:.0%}, needs about {pw.runs_for_effect} "
                     f"seeds per group (two-sample t-test, same alpha and power)")
    return lines


def verdict_line(s: dict[str, Any], summary: Report) -> str:
    """One sentence per group against the baseline, read off its effect's family-adjusted interval."""
    metric, plan, pw = summary.metric, summary.plan, summary.power
    spread = f", CV {_pct(s['cv'])}" if np.isfinite(s["cv"]) else ""
    head = f"`{s['group']}`: {metric} {_num(s['mean'])} (n={s['n']}{spread})"
    if s["is_baseline"]:
        return f"{head}: the baseline"
    if summary.baseline is None:
        return f"{head}: no baseline to compare with"
    base = summary.baseline.label
    if not np.isfinite(s["effect"]):
        return f"{head}: fewer than 2 runs here or in `{base}`, no comparison"
    how = "paired by seed" if s["paired"] else "Welch"
    effect = f"{_effect_cell(s)}, {1 - pw.alpha:.1%} interval ({how})" if pw else _effect_cell(s)
    if s["verdict"] == "better":
        return f"{head}: better than `{base}` by {effect}"
    if s["verdict"] == "worse":
        return f"{head}: worse than `{base}` by {effect}"
    if s["verdict"] == "equivalent":
        return f"{head}: equivalent to `{base}` within ±{plan.effect:.0%} ({effect})"
    line = f"{head}: inconclusive against `{base}` (effect {effect})"
    n = min(s["n"], int(summary.table.loc[summary.table["is_baseline"], "n"].iloc[0]))
    if n < MIN_RUNS_FOR_VERDICT:
        line += f"; n={n}, fewer than the {MIN_RUNS_FOR_VERDICT} runs per group a verdict needs"
    if pw is not None and np.isfinite(pw.detectable_share):
        line += f"; these runs detect only differences >= {pw.detectable_share:.0%}"
    if pw is not None and pw.runs_for_effect > 0:
        line += f"; about {pw.runs_for_effect} seeds per group for ±{plan.effect:.0%}"
    return line


def identical_groups(summary_rows: list[dict[str, Any]]) -> list[str]:
    """Pairs of groups whose runs have exactly the same primary metric for every seed: usually a setting that
    never takes effect (a clip limit that never binds)."""
    notes = []
    seen: dict[str, str] = {}
    for s in summary_rows:
        key = s["values_by_seed"]
        if not key:
            continue
        if key in seen:
            notes.append(f"`{s['group']}` and `{seen[key]}` have identical {s['metric']} on every seed "
                         f"({key}): what tells them apart did not change the runs")
        else:
            seen[key] = s["group"]
    return notes


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r[h].replace("|", "\\|") for h in header) + " |" for r in rows]
    return "\n".join(lines)


def results_table(summary: Report) -> str:
    """The markdown table of every group (what comparison.md shows and the CLI prints)."""
    return markdown_table([_cells(s) for s in summary.table.to_dict("records")])


def _left_out_line(m: dict[str, Any]) -> str:
    line = f"- {m['run']}: {m['state']}" + (" resumably" if m["state"] == STOPPED else "")
    if pd.notna(m["steps"]):
        line += f" at step {int(m['steps'])}" + (f" of {int(m['total_steps'])}" if pd.notna(m["total_steps"]) else "")
    return line + (f" ({m['reason']})" if pd.notna(m["reason"]) else "")


def short_run_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Groups of runs shorter than the default run (smoke runs): their verdicts say little about a full run."""
    full = int(schema_default("trainer.total_steps"))
    return [f"`{s['group']}`: {s['total_steps']:,}-step runs, the default run is {full:,} steps: their returns and "
            "verdicts say little about a full run" for s in rows if s["total_steps"] < full]


def rule_change_notes(summary: Report) -> list[str]:
    """Runs made before a verdict rule changed, and what the earlier rule says of them: the collapse window
    (rules v1 -> v2) changed during the clip study, after one of its runs tripped the v1 rule."""
    rows = [m for df in summary.metrics.values() for m in df.to_dict("records") if m["finished"]]
    before = [m for m in rows if m["predates_collapse_window"]]
    if not before:
        return []
    v1 = [m["run"] for m in rows if m["collapsed_v1"]]
    return [f"verdict rules changed under these runs: {len(before)} of the {len(rows)} were made before rules v2 "
            f"(collapse judged on levels of monitor.collapse_window evaluations; v1 judged single evaluations). "
            f"Under v1, {len(v1)} of the {len(rows)} would be collapsed" + (f": {', '.join(v1)}" if v1 else "")]


def notes(summary: Report) -> list[str]:
    """What a reader must know before reading the table: warnings, limits that never or always bind, groups
    that are identical, verdict rules that changed under the runs."""
    rows = summary.table.to_dict("records")
    out = list(summary.warnings)
    out += [f"`{s['group']}`: {note}" for s in rows for note in binding_notes(s)]
    out += identical_groups(rows)
    out += short_run_notes(rows)
    out += rule_change_notes(summary)
    return out


def verdicts(summary: Report) -> list[str]:
    return [verdict_line(s, summary) for s in summary.table.to_dict("records")]


def plan_lines(summary: Report) -> list[str]:
    """The plan followed (recorded in the runs, or the default), and every departure from it."""
    plan = summary.plan
    lines = [("Plan (recorded in the runs when they started): " if plan.recorded else
              "Plan (none recorded, the runs predate plans; the defaults): ") + plan.text()]
    lines.append(f"Verdict rules v{RULES_VERSION}: {RULES[RULES_VERSION]}")
    away = summary.plan_notes + summary.departures
    lines += [f"Departure: {d}" for d in away] or ["Departures from the plan: none"]
    return lines


def _legend(summary: Report) -> str:
    metric = METRICS[summary.metric]
    n_comp = summary.power.comparisons if summary.power else 1
    columns = " ".join([m.legend for m in METRICS.values() if m.column and m.legend]
                       + [column.legend for column in NET_COLUMNS])
    return (f"Primary metric `{summary.metric}`: {metric.what}, per run; per group its mean with a 95% Student-t "
            f"interval and its coefficient of variation (CV = SD / mean over the group's runs). Effect vs baseline: "
            f"the difference of the group's mean from the baseline's, in % of the baseline's mean, with a "
            f"{1 - summary.plan.alpha / n_comp:.1%} interval: the plan's alpha shared by the {n_comp} comparison(s) "
            f"with the baseline (Bonferroni), Welch's t, or the paired t when both groups ran the same seeds and "
            f"their values correlate (one-sided Pearson test at 0.05). Verdict: better / worse when that interval "
            f"excludes 0 with at least {MIN_RUNS_FOR_VERDICT} runs in each group; equivalent when it lies within the "
            f"plan's ±{summary.plan.effect:.0%}; otherwise inconclusive. comparison.csv also holds the Holm-adjusted "
            f"p-values, every metric per group and P(improvement). Statistics use finished runs (completed, or "
            f"stopped by the NaN guard; a run stopped resumably, by a signal or a time-out, counts once resumed to "
            f"its end). {columns} Diverged: numerical failure (NaN guard, a non-finite logged value, "
            f"|Q| beyond the reward bound) or |Q| beyond monitor.q_return_factor x the largest |return| the run "
            f"played. Collapsed: the final level lost more than monitor.collapse_fraction of the gain of the run's "
            f"best level over its first evaluation; a level is the mean of monitor.collapse_window consecutive "
            f"evaluations. Failed to learn: the best level never rose more than monitor.learn_min_gain above what "
            f"random actions scored (the mean return of the run's warm-up episodes; rules v4 on).")


def markdown_report(summary: Report, plots: list[Path]) -> str:
    """comparison.md: the plan and its departures, the table, what its columns mean, power, verdicts, run
    verdicts (each run with its rule and step), alerts, left-out runs, notes and warnings, plots."""
    rows = summary.table.to_dict("records")
    n_runs = sum(len(g.runs) for g in summary.groups)
    md = [f"# Comparison: {n_runs} run(s) in {len(summary.groups)} group(s)", ""]
    md += [f"- {line}" for line in plan_lines(summary)] + [""]
    if summary.baseline is None:
        md.append("Baseline: none (no group clips at the default limits; pick one with --baseline or plan.baseline)")
    else:
        why = "named by --baseline or the plan" if summary.chosen else "clipping at the default limits"
        md.append(f"Baseline: `{summary.baseline.label}` ({why})")
    if summary.common:
        md += ["", f"Every run: `{' '.join(summary.common)}` (left out of the group names)"]
    md += ["", _legend(summary), "", results_table(summary), ""]
    md += ["## Power", ""] + [f"- {line}" for line in power_lines(summary)]
    md += ["", "## Verdicts", ""] + [f"- {line}" for line in verdicts(summary)]
    md += ["", "## Diverged, collapsed, failed to learn", ""]
    flagged = [m for df in summary.metrics.values() for m in df.to_dict("records")
               if m["finished"] and (m["diverged"] or m["collapsed"] or m["failed"])]
    md += [f"- {m['run']}: diverged: {m['diverged_why']}" for m in flagged if m["diverged"]]
    md += [f"- {m['run']}: collapsed: {m['collapsed_why']}" for m in flagged if m["collapsed"]]
    md += [f"- {m['run']}: failed to learn: {m['failed_why']}" for m in flagged if m["failed"]]
    if not flagged:
        md.append("- none: no run diverged, collapsed or failed to learn")
    md += ["", "## Evaluations behind the metric", ""]
    md += [f"- `{s['group']}`: {_num(s['late_evaluations'], 3)} late evaluation(s) per run (median) of "
           f"{s['eval_episodes']} episodes each" for s in rows]
    md += ["", "## Machines (where the wall times come from)", ""]
    md += [f"- `{s['group']}`: {s['machines'] or '-'}" for s in rows]
    md += ["", "## Alerts fired (flushes where each alert fired, summed over the group's runs)", ""]
    md += [f"- `{s['group']}`: {s['alerts_by_name'] or 'none'}" for s in rows]
    left_out = [m for df in summary.metrics.values() for m in df.to_dict("records") if not m["finished"]]
    md += ["", "## Runs left out of the statistics (crashed, failed, still running or stopped before their end)",
           ""]
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


def write_comparison(runs: list[Run], out: Path, baseline: str | None = None,
                     metric: str | None = None, levels: int = 1) -> Comparison:
    """Summarize ``runs`` and write ``comparison.md``, ``comparison.csv`` and ``plots/*.png`` into ``out``
    (``levels``: as :func:`av_td3.analysis.compare.summarize`)."""
    summary = summarize(runs, baseline, metric, levels)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots({g.label: [r for r in g.runs if r.finished] for g in summary.groups}, out / "plots")
    if summary.baseline is not None:
        effects = out / "plots" / "effects.png"
        confidence = 1 - (summary.power.alpha if summary.power else summary.plan.alpha)
        plot_effects(summary.table, summary.plan.effect, summary.metric, confidence, effects)
        plots.insert(0, effects)
    summary.table.to_csv(out / "comparison.csv", index=False)
    markdown = markdown_report(summary, plots)
    (out / "comparison.md").write_text(markdown)
    return Comparison(summary, results_table(summary), markdown, plots)


def seeds_table(runs: list[Run], effects: list[float] | None = None, baseline: str | None = None,
                metric: str | None = None, alpha: float | None = None, power: float | None = None,
                arms: int | None = None) -> str:
    """``av-td3 plan``: the seeds per group a study needs to detect each of ``effects`` (shares of the baseline's
    mean), from the spread of ``runs``' primary metric. The SD is an estimate from few runs, so each row also
    gives the seeds needed if the true SD is at the upper end of its 80% interval (chi-square)."""
    summary = summarize(runs, baseline, metric)
    plan, pw = summary.plan, summary.power
    if pw is None or summary.baseline is None:  # a Power exists only with a baseline
        raise ValueError("no baseline group: name one with --baseline")
    alpha = plan.alpha if alpha is None else alpha
    power = plan.power if power is None else power
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"--alpha {alpha:g} / --power {power:g}: each must lie between 0 and 1")
    k = arms if arms is not None else max(1, len(summary.groups) - 1)
    if k < 1:
        raise ValueError(f"--arms {k}: give the number of groups compared with the baseline (>= 1)")
    df = int(sum(max(0, s["n"] - 1) for s in summary.table.to_dict("records")))
    if not np.isfinite(pw.sd) or df < 1 or not pw.base_mean > 0:
        raise ValueError(f"{summary.metric}: too few runs with the metric (or a baseline mean <= 0) to plan from; "
                         "run at least 2 seeds of the baseline and of another group")
    sd_high = pw.sd * float(np.sqrt(df / scipy_stats.chi2.ppf(0.2, df)))
    effects = sorted(set(effects or [plan.effect, 0.1, 0.2, 0.3]))
    n_runs = sum(s["n"] for s in summary.table.to_dict("records"))
    base = summary.baseline.label
    lines = [f"Spread from {n_runs} runs in {len(summary.groups)} groups: {summary.metric}, within-group SD "
             f"pooled over the groups {_num(pw.sd)} ({df} degrees of freedom; 80% upper bound {_num(sd_high)}); "
             f"baseline `{base}` mean {_num(pw.base_mean)}, so CV {pw.sd / pw.base_mean:.1%}.",
             f"Seeds per group for {power:.0%} power, two-sided alpha {alpha:g} shared by {k} comparison(s) with "
             f"the baseline ({alpha / k:.3g} each):", ""]
    rows = []
    for effect in effects:
        diff = effect * pw.base_mean
        n = stats.runs_needed(diff, pw.sd, alpha / k, power)
        n_high = stats.runs_needed(diff, sd_high, alpha / k, power)
        rows.append({"effect": f"±{effect:.0%}", "difference": _num(diff), "seeds per group": str(n),
                     "if the SD is at its upper bound": str(n_high),
                     f"runs in all ({k + 1} groups)": str(n * (k + 1))})
    lines.append(markdown_table(rows))
    lines += ["", "Write the chosen number into the experiment's plan.seeds (and its sweeper's seed list) before "
              "its runs start; use seeds never used for tuning."]
    return "\n".join(lines)
