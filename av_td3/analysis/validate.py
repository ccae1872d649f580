"""``av-td3 validate``: check that every run clipped what it claims, stayed finite, trained both networks and did
not diverge, using the limits from the run's own ``.hydra/config.yaml`` (never from the command line, so a sweep
with different limits per job is checked job by job). Divergence and collapse are the verdicts of
:mod:`av_td3.analysis.verdicts`; a collapse and gradient spikes are notes, not failures: they are results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from av_td3 import tags
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run
from av_td3.analysis.verdicts import Verdict, judge
from av_td3.bounds import q_bound
from av_td3.rundir import INVARIANT_ALERTS
from av_td3.tags import AFTER, BEFORE, NETS


@dataclass
class RunCheck:
    run: Run
    verdict: Verdict = field(default_factory=Verdict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    after_clip_max: dict[str, float] = field(default_factory=dict)  # per net; absent when nothing logged

    @property
    def ok(self) -> bool:
        return not self.problems


def _fmt(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.5g}"


def _finite(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isfinite(df["value"].to_numpy())]


def _check_net(df: pd.DataFrame, net: str, run: Run, check: RunCheck) -> None:
    cfg = run.config
    assert cfg is not None
    updates = series(df, tags.updates(net))
    if not (updates > 0).any():
        check.problems.append(f"{net}: no updates logged ({tags.updates(net)} never > 0)")
    # In shared-encoder mode the CNN is trained by the critic only, so the actor logs no cnn part.
    parts = ("mlp",) if net == "actor" and cfg.agent.encoder == "shared" else ("cnn", "mlp")
    for part in parts:
        tag = tags.grad_norm(net, part, BEFORE)
        norms = series(df, tag)
        if norms.empty:
            check.problems.append(f"{net} {part}: no gradient norms logged ({tag} missing)")
        elif not (norms > 0).any():
            check.problems.append(f"{net} {part}: dead gradient ({tag} is 0 at every step)")

    tol = float(cfg.monitor.tolerance)
    # Every mode logs each interval's largest after-clip / limit-used ratio: the invariant is ratio <= 1. In the
    # global-norm modes it is the net's global norm over its limit; under agc, the worst unit's norm over its own.
    ratio = _finite(df[df["tag"] == tags.after_over_limit(net)])
    if len(ratio) and np.float32(ratio["value"].max()) > np.float32(1 + tol):
        worst = ratio.loc[ratio["value"].idxmax()]
        what = "a unit's after-clip norm" if cfg.agent.clip.mode == "agc" else "after-clip norm"
        check.problems.append(f"{net}: {what} {worst['value']:.6g} x the limit used at step "
                              f"{worst['step']} (> 1 + monitor.tolerance = {1 + tol:g}): the clip did not hold")
    # A fixed limit (mode=norm) also holds every after-clip tag: each part's norm is <= the global norm.
    limit = cfg.agent.clip[net] if cfg.agent.clip.mode == "norm" else None
    after = _finite(df[df["tag"].str.fullmatch(tags.grad_norm_pattern(net, AFTER))])
    if after.empty:
        if cfg.agent.clip[net] is not None:
            check.problems.append(f"{net}: clipped ({cfg.agent.clip.mode}) but no after-clip norms logged")
        return
    worst = after.loc[after["value"].idxmax()]
    check.after_clip_max[net] = float(worst["value"])
    # TensorBoard stores float32: a norm clipped to exactly 0.3 reads back as 0.30000001. Rounding the threshold
    # the same way keeps every value <= threshold passing (rounding is monotonic) even with monitor.tolerance=0.
    if limit is not None and np.float32(worst["value"]) > np.float32(limit * (1 + tol)):
        check.problems.append(f"{net}: {worst['tag']} = {worst['value']:.6g} at step {worst['step']} exceeds "
                              f"the limit {limit:g} x (1 + {tol:g})")


def _check_alerts(df: pd.DataFrame, check: RunCheck) -> None:
    names = "|".join(INVARIANT_ALERTS)
    fired = df[df["tag"].str.fullmatch(rf"{tags.ALERT_PREFIX}[^/]+/(?:{names})") & (df["value"] > 0)]
    for tag, steps in fired.groupby("tag")["step"]:
        check.problems.append(f"alert {tag} fired at {len(steps)} flush(es), first at step {steps.min()}")


def _verdict_lines(check: RunCheck) -> None:
    v = check.verdict
    if v.diverged:
        check.problems.append(f"diverged: {v.diverged}")
    if v.collapsed:
        check.notes.append(f"collapsed: {v.collapsed}")
    for net, (spikes, updates) in v.spikes.items():
        if spikes:
            check.notes.append(f"{net}: {spikes} gradient spike(s) in {updates} updates "
                               f"({v.spike_rate(net):.2f} per 1k updates)")


def check_run(run: Run) -> RunCheck:
    """All checks on one run; each failed check adds a problem naming the tag, step and limit."""
    check = RunCheck(run)
    df = run.scalars
    if df.empty:
        check.problems.append("no scalars logged")
        return check
    check.verdict = judge(run)
    _verdict_lines(check)
    if run.config is None:
        check.notes.append("limits unknown (no .hydra/config.yaml two levels above the event file): "
                           "only finiteness checked")
        return check
    if run.config.agent.name == "pid":
        check.notes.append("agent.name=pid has no networks: gradient, clipping and Q checks do not apply")
    else:
        for net in NETS:
            _check_net(df, net, run, check)
    _check_alerts(df, check)
    return check


def _limit_cell(check: RunCheck, net: str) -> str:
    cfg = check.run.config
    if cfg is None:
        return "unknown"
    if cfg.agent.name == "pid":
        return "n/a"
    limit, mode = cfg.agent.clip[net], cfg.agent.clip.mode
    if limit is None:
        used = "unclipped"
    elif mode == "norm":
        used = f"{limit:g}"
    elif mode == "agc":  # per unit: no global limit to set the norm against
        used = f"agc, per unit (lambda {cfg.agent.clip.agc:g})"
    else:
        used = f"{mode} (warm-up {limit:g})"
    return f"{_fmt(check.after_clip_max.get(net))} / {used}"


def _q_cell(check: RunCheck) -> str:
    cfg = check.run.config
    if cfg is None:
        return "unknown"
    return "n/a" if cfg.agent.name == "pid" else f"{_fmt(check.verdict.q_abs_max)} / {_fmt(q_bound(cfg))}"


def text_table(columns: dict[str, list[str]]) -> str:
    """Left-aligned plain-text table (run names read better left-aligned than pandas' right-justified text)."""
    widths = {h: max(len(h), *(len(v) for v in values)) for h, values in columns.items()}
    rows = zip(*columns.values())
    lines = ["  ".join(h.ljust(widths[h]) for h in columns)]
    lines += ["  ".join(v.ljust(widths[h]) for h, v in zip(columns, row)).rstrip() for row in rows]
    return "\n".join(lines)


def report(checks: list[RunCheck]) -> str:
    """The per-run table, then each failing run's problems and any notes."""
    table = text_table({
        "run": [c.run.name for c in checks],
        "status": [c.run.state if c.run.config is not None else "-" for c in checks],
        "actor after-clip max / limit": [_limit_cell(c, "actor") for c in checks],
        "critic after-clip max / limit": [_limit_cell(c, "critic") for c in checks],
        "|Q| max / bound": [_q_cell(c) for c in checks],
        "result": ["PASS" if c.ok else "FAIL" for c in checks],
    })
    lines = [table, ""]
    for c in checks:
        lines += [f"FAIL {c.run.name}: {p}" for p in c.problems]
        lines += [f"note {c.run.name}: {n}" for n in c.notes]
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} run(s) passed.")
    return "\n".join(lines)
