"""``av-td3 compare``, the report: the numbers of :mod:`av_td3.analysis.compare` as ``comparison.md`` (table,
what its columns mean, verdicts, divergence and collapse with their rules, alerts, left-out runs, notes and
warnings, plots), ``comparison.csv`` and ``plots/*.png``; the CLI prints the table, verdicts and notes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from av_td3.analysis import stats
from av_td3.analysis.compare import (ALWAYS_BINDS, MIN_RUNS_FOR_VERDICT, NEVER_BINDS, NORM_PERCENTILES, Report,
                                     summarize)
from av_td3.analysis.plots import write_plots
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import NETS


# ------------------------------------------------------------------------------------------------------ words
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
    if s["is_baseline"] or not np.isfinite(s["return_vs_baseline"]):
        cells["IQM / baseline"] = "-"
    else:
        cells["IQM / baseline"] = _pct(s["return_vs_baseline"]) + (
            f" [{_pct(s['return_vs_baseline_low'])}, {_pct(s['return_vs_baseline_high'])}]"
            if np.isfinite(s["return_vs_baseline_low"]) else "")
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


def results_table(summary: Report) -> str:
    """The markdown table of every group (what comparison.md shows and the CLI prints)."""
    return markdown_table([_cells(s) for s in summary.table.to_dict("records")])


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
           "(ties count half), with a 95% bootstrap interval. IQM / baseline: the group's return IQM and its "
           "interval as shares of the baseline's IQM (the baseline's own spread is not in the interval). Clipping: share of updates clipped and the limit "
           "(for the adaptive modes the median limit used). Norm p50/p90/p99: percentiles of the before-clip "
           "global gradient norm within each logging interval, median over the run's intervals and the group's "
           "runs. Spikes: updates whose before-clip norm jumped more than monitor.spike_z std above its running "
           "log-mean, per 1,000 updates. Diverged: numerical failure only (NaN guard, a non-finite logged value, "
           "|Q| beyond the reward bound). Collapsed: the final level lost more than monitor.collapse_fraction of "
           "the gain of the run's best level over its first evaluation; a level is the mean of "
           "monitor.collapse_window consecutive evaluations (the last ones; the best window).", "",
           results_table(summary), ""]
    md += ["## Verdicts", ""] + [f"- {line}" for line in verdicts(summary)]
    md += ["", "## Divergence and collapse", ""]
    flagged = [m for df in summary.metrics.values() for m in df.to_dict("records")
               if m["finished"] and (m["diverged"] or m["collapsed"])]
    md += [f"- {m['run']}: diverged: {m['diverged_why']}" for m in flagged if m["diverged"]]
    md += [f"- {m['run']}: collapsed: {m['collapsed_why']}" for m in flagged if m["collapsed"]]
    if not flagged:
        md.append("- none: no run diverged or collapsed")
    md += ["", "## Machines (where the wall times come from)", ""]
    md += [f"- `{s['group']}`: {s['machines'] or '-'}" for s in rows]
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


def write_comparison(runs: list[Run], out: Path, baseline: str | None = None) -> Comparison:
    """Summarize ``runs`` and write ``comparison.md``, ``comparison.csv`` and ``plots/*.png`` into ``out``."""
    summary = summarize(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots({g.label: [r for r in g.runs if r.finished] for g in summary.groups}, out / "plots")
    summary.table.to_csv(out / "comparison.csv", index=False)
    markdown = markdown_report(summary, plots)
    (out / "comparison.md").write_text(markdown)
    return Comparison(summary, results_table(summary), markdown, plots)
