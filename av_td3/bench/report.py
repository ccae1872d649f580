"""From measured rows to what a reader sees: the ratios (paired by repetition where the rows were interleaved)
and ``bench.md``, the markdown table the command also prints."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from av_td3.bench.machine import busy_warning
from av_td3.bench.result import REGRESSION_PREFIX, TODAY, BenchResult, busy_row, pair_ratios, paired_ratio, targets


def compute_ratios(result: BenchResult) -> dict[str, float]:
    """Update ratios are medians of per-repetition ratios (wall time; ``*_cpu``: process CPU time); the
    monitor overhead is the extra time per update with monitoring on, in %; ``regression_vs_<commit>_threads<N>``
    is today's code over the commit's, the median of the ratios of runs paired back to back."""
    rows = {r.name: r for r in result.rows}
    ratios: dict[str, float] = {}

    def pair(a: str, b: str, key: str, fn: Callable[[float], float] = lambda x: x) -> None:
        if f"update/{a}" in rows and f"update/{b}" in rows:
            ra, rb = rows[f"update/{a}"], rows[f"update/{b}"]
            ratios[key] = fn(paired_ratio(ra.values, rb.values))
            if ra.cpu_values and rb.cpu_values:
                ratios[f"{key}_cpu"] = fn(paired_ratio(ra.cpu_values, rb.cpu_values))

    for mode in ("separate", "shared", "separate_compile"):
        pair(f"ours_{mode}", "sb3", f"{mode}_vs_sb3")
    pair("ours_separate_compile", "ours_separate", "compile_speedup")
    overhead = lambda r: (r - 1.0) * 100.0  # noqa: E731  (rate off / rate on - 1)
    pair("ours_separate_monitor_off", "ours_separate", "monitor_overhead_pct", overhead)
    pair("ours_shared_monitor_off", "ours_shared", "monitor_overhead_pct_shared", overhead)
    pair("default_monitor_off", "default", "default_monitor_overhead_pct", overhead)
    pair("default_bf16", "default", "default_bf16_speedup")
    for name in rows:
        fraction = rows[name].matmul_fraction
        if name.startswith("update/") and fraction is not None:
            ratios[f"{name.removeprefix('update/')}_update_matmul_fraction"] = fraction
    med = {r.name: r.median for r in result.rows}
    if "e2e/default" in med:
        ratios["default_e2e_steps_per_s"] = med["e2e/default"]
        if "e2e/default_sb3" in med:  # two runs one after the other: medians, not pairs
            ratios["default_e2e_vs_sb3"] = med["e2e/default"] / med["e2e/default_sb3"]
    if "replay/ours" in med:
        ratios["replay_vs_reference"] = med["replay/ours"] / med["replay/reference"]
        for name in ("replay/sb3", "replay/sb3_optimize_memory_usage"):
            if name in med:
                ratios[f"{name.split('/')[1]}_vs_ours"] = med[name] / med["replay/ours"]
    if "env/steps_per_s" in med:
        ratios["env_steps_per_s"] = med["env/steps_per_s"]
    if "env/steps_per_s_bev" in med:
        ratios["env_bev_steps_per_s"] = med["env/steps_per_s_bev"]
    for name in med:
        if name.startswith("e2e/steps_per_s_num_envs_"):
            ratios[f"e2e_{name.removeprefix('e2e/steps_per_s_')}_vs_1"] = med[name] / med["e2e/steps_per_s"]
    if "env/steps_per_s_stock_road" in rows:
        ratios["env_vectorised_road_speedup"] = paired_ratio(rows["env/steps_per_s"].values,
                                                             rows["env/steps_per_s_stock_road"].values)
    if busy_row(0) in rows and busy_row(1) in rows:  # paired by A/B repetition
        ratios["busy_default_vs_threads1"] = paired_ratio(rows[busy_row(0)].values, rows[busy_row(1)].values)
    # today / the earlier commit, paired by A/B repetition (the two runs of a pair ran back to back)
    today = f"{REGRESSION_PREFIX}{TODAY}_"
    for name, row in rows.items():
        if name.startswith(REGRESSION_PREFIX) and not name.startswith(today):
            code, threads = name.removeprefix(REGRESSION_PREFIX).split("_", 1)
            if today + threads in rows:
                key, new = f"regression_vs_{code}_{threads}", rows[today + threads].values
                ratios[key] = paired_ratio(new, row.values)
                if len(row.values) > 1:  # the spread of the pairs: how far one ratio could sit from the median
                    pairs = pair_ratios(new, row.values)
                    ratios[f"{key}_lowest_pair"], ratios[f"{key}_highest_pair"] = min(pairs), max(pairs)
    return ratios


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def markdown(result: BenchResult) -> str:
    """``bench.md``: the machine, the sizes, every row (skipped ones with the reason), the phase breakdown, a
    warning on a busy machine, and the ratios with their targets."""
    m, c = result.machine, result.config
    load = m.get("load_avg_1m_at_start")
    lines = [f"# av-td3 bench ({c['timestamp']})", "",
             f"Machine: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
             f"torch {m['torch']} ({m['torch_threads']} threads, {m['cpu_capability']}), device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f", SB3 {m['stable_baselines3'] or 'not installed'}"
             + (f", load average {load:.2f} at start" if load is not None else "")
             + "".join(f", {k}={v}" for k, v in m.get("env", {}).items() if v is not None)
             + (f", freed memory {m['freed_memory']}" if m.get("freed_memory") else "") + ".", "",
             "Headline rows (`default`): the shipped configuration"
             + (f" with {' '.join(c['overrides'])}" if c.get("overrides") else "") + ". "
             f"Secondary rows' sizes: batch {c['batch_size']}, image {c['stack']}x{c['height']}x{c['width']}, "
             f"features_dim {c['features_dim']}, hidden {c['hidden_layers']}x{c['hidden_dim']}; "
             f"{'quick' if c['quick'] else 'full'} run. Update rows: {c['update_reps']} interleaved reps of "
             f"{c['updates_per_rep']} updates.", "",
             "| row | median | unit | min | max | reps | per CPU-second | GFLOP/update | % of matmul rate | what |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result.rows:
        cpu = "" if r.cpu_values is None else _fmt(statistics.median(r.cpu_values))
        gflop = "" if r.flop_per_update is None else f"{r.flop_per_update / 1e9:.3g}"
        pct = "" if r.matmul_fraction is None else f"{100 * r.matmul_fraction:.0f}%"
        lines.append(f"| {r.name} | {_fmt(r.median)} | {r.unit} | {_fmt(min(r.values))} | {_fmt(max(r.values))} "
                     f"| {len(r.values)} | {cpu} | {gflop} | {pct} | {r.note} |")
    for name, why in result.skipped.items():
        lines.append(f"| {name} | skipped | | | | | | | | {why} |")
    lines += breakdown_markdown(result.breakdown)
    warning = busy_warning(m)
    if warning:
        lines += ["", f"**Warning:** {warning}"]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    shown = set()
    for t in targets(result.ratios):
        shown.add(t["name"])
        value = "n/a" if t["value"] is None else _fmt(t["value"])
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {value} | {t['target']} | {met} |")
    for k, v in result.ratios.items():
        if k not in shown:
            lines.append(f"| {k} | {_fmt(v)} | | |")
    return "\n".join(lines) + "\n"


def breakdown_markdown(breakdown: dict[str, Any]) -> list[str]:
    """The phase breakdown of ``e2e/default``'s training steps as markdown lines (none without it)."""
    if not breakdown:
        return []
    lines = ["", f"Where a training step of `e2e/default` goes ({breakdown['steps']} steps after learning_starts, "
                 f"{breakdown['ms_per_step']:.1f} ms per step):", "",
             "| phase | ms per step | share |", "|---|---:|---:|"]
    for name, p in sorted(breakdown["phases"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        lines.append(f"| {name} | {p['ms_per_step']:.2f} | {100 * p['share']:.1f}% |")
    for name, seconds in breakdown["not_per_step_s"].items():
        lines.append(f"| {name} (once, not in the shares) | {seconds:.2f} s in all | |")
    return lines
