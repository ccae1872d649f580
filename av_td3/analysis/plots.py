"""Comparison plots. Built on ``matplotlib.figure.Figure`` (no pyplot), which renders with the Agg canvas and
touches no global backend state, so it works headless and inside other programs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from av_td3.analysis import stats
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.rundir import DIVERGENCE_ALERTS, INVARIANT_ALERTS
from av_td3.tags import AFTER, ALERT_PREFIX, BEFORE, NETS, clip_limit, grad_norm, norm_percentile

BAND_REPS = 500  # per evaluation step; a band is a visual aid, the table carries the precise intervals


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


LINE_STYLES = ("-", "-.", ":")  # per group, so coinciding curves stay distinguishable ("--": a one-point level)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_eval_return(groups: dict[str, list[Run]], path: Path) -> None:
    eval_return_figure(groups).savefig(path, dpi=100)


def eval_return_figure(groups: dict[str, list[Run]]) -> Figure:
    """Evaluation return against env steps: per group the IQM over seeds with a 95% bootstrap band, and each
    seed as a thin line. A group evaluated at one step only (a short controller run used as the baseline) would
    be a line of no length: it is drawn as a marker there and a dashed level across the plot."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for k, ((label, runs), color) in enumerate(zip(groups.items(), _colors(len(groups)))):
        style = LINE_STYLES[k % len(LINE_STYLES)]
        curves = pd.DataFrame({r.name: series(r.scalars, "eval/return") for r in runs})
        if curves.empty:
            continue
        drawn = True
        for name in curves:
            ax.plot(curves.index, curves[name], color=color, lw=0.7, alpha=0.35)
        steps = curves.index.to_numpy()
        values = [row[np.isfinite(row)] for row in curves.to_numpy()]
        level = [float(stats.iqm(v)) if len(v) else np.nan for v in values]  # 1-D rows: one scalar each
        if len(steps) == 1:
            ax.plot(steps, level, color=color, marker="o", ls="none")
            ax.axhline(level[0], color=color, lw=1.5, ls="--",
                       label=f"{label} (n={len(runs)}, evaluated at step {steps[0]:,} only: dashed level)")
            continue
        ax.plot(steps, level, color=color, lw=2, ls=style, label=f"{label} (n={len(runs)})")
        band = [stats.iqm_ci(v, reps=BAND_REPS) if len(v) >= 2 else (np.nan, np.nan) for v in values]
        ax.fill_between(steps, [b[0] for b in band], [b[1] for b in band], color=color, alpha=0.2, lw=0)
    if not drawn:
        _empty(ax, "no evaluation return logged")
    else:
        ax.set_xlabel("env step")
        ax.set_ylabel("evaluation return (IQM, 95% CI; thin: seeds)")
        ax.legend(fontsize="small")
    return fig


def plot_grad_norms(groups: dict[str, list[Run]], path: Path) -> None:
    """Global gradient norm before and after clipping, one panel per group and network, with the limit."""
    fig = Figure(figsize=(12, 2.8 * len(groups) + 0.5), layout="constrained")
    axes = fig.subplots(len(groups), len(NETS), squeeze=False)
    for row, (label, runs) in zip(axes, groups.items()):
        for ax, net in zip(row, NETS):
            ax.set_title(f"{label}: {net}", fontsize="small")
            if not runs:
                _empty(ax, "no finished runs")
                continue
            before = [series(r.scalars, grad_norm(net, "total", BEFORE)) for r in runs]
            after = [series(r.scalars, grad_norm(net, "total", AFTER)) for r in runs]
            if not any(len(s) for s in before + after):
                _empty(ax, "no gradient norms logged")
                continue
            for i, (b, a) in enumerate(zip(before, after)):
                ax.plot(b.index, b, color="C0", lw=0.8, label="before clip (mean)" if i == 0 else None)
                ax.plot(a.index, a, color="C1", lw=0.8, ls="--", label="after clip (mean)" if i == 0 else None)
            for i, r in enumerate(runs):
                p99 = series(r.scalars, norm_percentile(net, 99))
                ax.plot(p99.index, p99, color="C2", lw=0.6, alpha=0.7, label="before clip p99" if i == 0 else None)
            cfg = runs[0].known_config
            limit = cfg.agent.clip[net]
            used = [series(r.scalars, clip_limit(net)) for r in runs]
            if limit is not None and cfg.agent.clip.mode != "norm" and any(len(u) for u in used):
                for i, u in enumerate(used):  # the adaptive limit as it was used, interval means
                    ax.plot(u.index, u, color="k", lw=0.8, ls=":",
                            label=f"limit used ({cfg.agent.clip.mode})" if i == 0 else None)
            elif limit is not None:
                ax.axhline(limit, color="k", lw=0.8, ls=":", label=f"limit {limit:g}")
            ax.set_yscale("log")  # norms span orders of magnitude when clipping matters
            ax.set_xlabel("env step")
            ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=100)


def plot_alerts(groups: dict[str, list[Run]], path: Path) -> None:
    """When each alert fired, one panel per group over the group's whole step range; a mark is darker the more
    seeds fired it at that step; divergence and broken-clip alerts in red. When no run fired any, one panel says
    so (not a blank panel per group)."""
    if not any(_fired(r.scalars).shape[0] for runs in groups.values() for r in runs):
        fig = Figure(figsize=(8, 1.5), layout="constrained")
        _empty(fig.add_subplot(), f"no alert fired in any run of the {len(groups)} group(s)")
        fig.savefig(path, dpi=100)
        return
    fig = Figure(figsize=(12, 2.5 * len(groups) + 0.5), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (label, runs) in zip(axes, groups.items()):
        ax.set_title(label, fontsize="small")
        if not runs:
            _empty(ax, "no finished runs")
            continue
        frames = [r.scalars for r in runs]
        fired = pd.concat([_fired(df) for df in frames])
        if fired.empty:
            _empty(ax, "no alerts fired")
            continue
        seeds = fired.groupby(["tag", "step"]).size().reset_index(name="seeds")
        tags = sorted(seeds["tag"].unique())
        severe = DIVERGENCE_ALERTS + INVARIANT_ALERTS
        colors = ["red" if t.rsplit("/", 1)[-1] in severe else "darkorange" for t in seeds["tag"]]
        ax.scatter(seeds["step"], seeds["tag"].map(tags.index), c=colors, marker="|", s=300, linewidths=2,
                   alpha=(0.3 + 0.7 * seeds["seeds"] / len(runs)).to_numpy())
        ax.set_yticks(range(len(tags)), [t.removeprefix(ALERT_PREFIX) for t in tags], fontsize="x-small")
        ax.set_ylim(-0.5, len(tags) - 0.5)
        ax.set_xlim(0, max(int(df["step"].max()) for df in frames if not df.empty))
        ax.set_xlabel(f"env step (mark: fired in a flush; darker: more of the {len(runs)} seeds)")
    fig.savefig(path, dpi=100)


def plot_effects(table: pd.DataFrame, margin: float, metric: str, confidence: float, path: Path) -> None:
    """Each group's effect on the primary metric against the baseline, in % of the baseline's mean, with its
    family-adjusted interval; the plan's equivalence margin +-``margin`` shaded, 0 marked."""
    rows = table[~table["is_baseline"]].reset_index(drop=True)
    fig = Figure(figsize=(8, 0.6 * max(len(rows), 1) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    shown = rows[np.isfinite(rows["effect_pct"].to_numpy(dtype=float))] if len(rows) else rows
    if shown.empty:
        _empty(ax, "no effect to draw (no baseline, or fewer than 2 runs with the metric)")
        fig.savefig(path, dpi=100)
        return
    y = np.arange(len(shown))
    mid = 100 * shown["effect_pct"].to_numpy(dtype=float)
    lo, hi = 100 * shown["effect_pct_low"].to_numpy(dtype=float), 100 * shown["effect_pct_high"].to_numpy(dtype=float)
    ax.axvspan(-100 * margin, 100 * margin, color="0.9",
               label=f"±{margin:.0%}: the plan's smallest effect of interest")
    ax.axvline(0, color="k", lw=0.8)
    ax.errorbar(mid, y, xerr=[mid - lo, hi - mid], fmt="o", color="C0", capsize=4,
                label=f"effect, {confidence:.1%} interval (adjusted for {len(rows)} comparison(s))")
    ax.set_yticks(y, [f"{g} (n={n})" for g, n in zip(shown["group"], shown["n"])], fontsize="small")
    ax.set_xlabel(f"{metric}: difference from the baseline, % of the baseline's mean")
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.legend(fontsize="x-small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    fig.savefig(path, dpi=100)


def _fired(df: pd.DataFrame) -> pd.DataFrame:
    """The alert flushes where an alert fired."""
    return df[df["tag"].str.startswith(ALERT_PREFIX) & (df["value"] > 0)]


def write_plots(groups: dict[str, list[Run]], folder: Path) -> list[Path]:
    """Write every per-run comparison plot into ``folder``; ``groups`` maps a group label to the runs to draw."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "eval_return.png", folder / "grad_norms.png", folder / "alerts.png"]
    for plot, path in zip((plot_eval_return, plot_grad_norms, plot_alerts), paths):
        plot(groups, path)
    return paths


def plot_when_map(table: pd.DataFrame, levels: list[str], margin: float, metric: str, confidence: float,
                  path: Path) -> None:
    """The "when" map: each arm's effect against the baseline of its own level (% of that baseline's mean, with
    the interval adjusted for every comparison of the map) against the stress level; ``table``: one row per
    (level, group) as :func:`av_td3.analysis.whenmap.write_when_map` builds it, ``levels`` in axis order."""
    fig = Figure(figsize=(max(6.0, 1.8 * len(levels) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    rows = table[~table["is_baseline"] & np.isfinite(table["effect_pct"].to_numpy(dtype=float))]
    if rows.empty:
        _empty(ax, "no effect to draw (no level has a baseline and another arm with 2 or more runs)")
        fig.savefig(path, dpi=100)
        return
    groups = sorted(set(rows["group"]))
    colors = _colors(len(groups))
    width = 0.6 / max(1, len(groups))
    ax.axhspan(-100 * margin, 100 * margin, color="0.9", label=f"±{margin:.0%}: the plan's smallest effect of interest")
    ax.axhline(0, color="k", lw=0.8)
    for i, group in enumerate(groups):
        g = rows[rows["group"] == group]
        x = np.array([levels.index(level) for level in g["level"]]) + (i - (len(groups) - 1) / 2) * width
        mid = 100 * g["effect_pct"].to_numpy(dtype=float)
        lo = 100 * g["effect_pct_low"].to_numpy(dtype=float)
        hi = 100 * g["effect_pct_high"].to_numpy(dtype=float)
        ax.errorbar(x, mid, yerr=[mid - lo, hi - mid], fmt="o-", color=colors[i], capsize=3, lw=1, label=group)
    ax.set_xticks(range(len(levels)), [level.replace(", ", "\n") for level in levels], fontsize="small")
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_xlabel("stress level")
    ax.set_ylabel(f"{metric}: effect vs its level's baseline, %")
    ax.set_title(f"{confidence:.1%} intervals, adjusted for every comparison of the map", fontsize="small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.savefig(path, dpi=100)
