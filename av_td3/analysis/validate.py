"""``av-td3 validate``: check that every run clipped what it claims, stayed finite, trained both networks and did
not diverge, using the limits from the run's own ``.hydra/config.yaml`` (never from the command line, so a sweep
with different limits per job is checked job by job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from av_td3.analysis.bounds import q_bound
from av_td3.analysis.events import series
from av_td3.analysis.runs import Run

NETS = ("actor", "critic")
CRITICAL_ALERTS = ("clip_violation", "grad_explosion_critical", "q_divergence")
# |actor loss| = |mean Q of the policy's actions|, so it is held to the same bound as the critics' Q values.
Q_TAGS = ("train/q1", "train/q2", "train/q_abs_max", "train/actor_loss")


@dataclass
class RunCheck:
    run: Run
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    after_clip_max: dict[str, float] = field(default_factory=dict)  # per net; absent when nothing logged
    q_abs_max: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.problems


def _fmt(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.5g}"


def _finite(df: pd.DataFrame) -> pd.DataFrame:
    return df[np.isfinite(df["value"].to_numpy())]


def _check_finite(df: pd.DataFrame, check: RunCheck) -> None:
    bad = df[~np.isfinite(df["value"].to_numpy())]
    if len(bad):
        first = bad.groupby("tag", sort=False)["step"].min()
        shown = ", ".join(f"{tag} (step {step})" for tag, step in first.head(3).items())
        more = f" and {len(first) - 3} more tags" if len(first) > 3 else ""
        check.problems.append(f"non-finite values in {shown}{more}")


def _check_net(df: pd.DataFrame, net: str, run: Run, check: RunCheck) -> None:
    cfg = run.config
    assert cfg is not None
    updates = series(df, f"grad/{net}/updates")
    if not (updates > 0).any():
        check.problems.append(f"{net}: no updates logged (grad/{net}/updates never > 0)")
    # In shared-encoder mode the CNN is trained by the critic only, so the actor logs no cnn part.
    parts = ("mlp",) if net == "actor" and cfg.agent.encoder == "shared" else ("cnn", "mlp")
    for part in parts:
        tag = f"grad/{net}/{part}/before_clip"
        norms = series(df, tag)
        if norms.empty:
            check.problems.append(f"{net} {part}: no gradient norms logged ({tag} missing)")
        elif not (norms > 0).any():
            check.problems.append(f"{net} {part}: dead gradient ({tag} is 0 at every step)")

    limit = cfg.agent.clip[net]
    # Every part's norm is <= the global norm, so any after-clip tag of the net must respect the global limit.
    after = _finite(df[df["tag"].str.fullmatch(rf"grad/{net}/[^/]+/after_clip(?:_max)?")])
    if after.empty:
        if limit is not None:
            check.problems.append(f"{net}: clipped at {limit:g} but no after-clip norms logged")
        return
    worst = after.loc[after["value"].idxmax()]
    check.after_clip_max[net] = float(worst["value"])
    tol = float(cfg.monitor.tolerance)
    # TensorBoard stores float32: a norm clipped to exactly 0.3 reads back as 0.30000001. Rounding the threshold
    # the same way keeps every value <= threshold passing (rounding is monotonic) even with monitor.tolerance=0.
    if limit is not None and np.float32(worst["value"]) > np.float32(limit * (1 + tol)):
        check.problems.append(f"{net}: {worst['tag']} = {worst['value']:.6g} at step {worst['step']} exceeds "
                              f"the limit {limit:g} x (1 + {tol:g})")


def _check_alerts(df: pd.DataFrame, run: Run, check: RunCheck) -> None:
    names = "|".join(CRITICAL_ALERTS)
    fired = df[df["tag"].str.fullmatch(rf"alert/[^/]+/(?:{names})") & (df["value"] > 0)]
    for tag, steps in fired.groupby("tag")["step"]:
        check.problems.append(f"critical alert {tag} fired at {len(steps)} flush(es), first at step {steps.min()}")
    # The summary counts alerts over the whole run, including any part whose event file is not being read.
    reported = int((run.summary or {}).get("critical_alerts") or 0)
    if reported and fired.empty:
        check.problems.append(f"summary.json reports {reported} critical alert(s)")


def _check_q(df: pd.DataFrame, run: Run, check: RunCheck) -> None:
    q = _finite(df[df["tag"].isin(Q_TAGS)])
    if q.empty:
        return
    i = q["value"].abs().idxmax()
    check.q_abs_max = abs(float(q.at[i, "value"]))
    bound = q_bound(run.config)
    if check.q_abs_max > bound:
        check.problems.append(f"Q diverged: |{q.at[i, 'tag']}| = {check.q_abs_max:.6g} at step {q.at[i, 'step']} "
                              f"exceeds max|r| / (1 - gamma) x q_margin = {bound:.6g}")


def check_run(run: Run) -> RunCheck:
    """All checks on one run; each failed check adds a problem naming the tag, step and limit."""
    check = RunCheck(run)
    df = run.scalars
    if df.empty:
        check.problems.append("no scalars logged")
        return check
    _check_finite(df, check)
    if run.config is None:
        check.notes.append("limits unknown (no .hydra/config.yaml two levels above the event file): "
                           "only finiteness checked")
        return check
    if run.config.agent.name == "pid":
        check.notes.append("agent.name=pid has no networks: gradient, clipping and Q checks do not apply")
    else:
        for net in NETS:
            _check_net(df, net, run, check)
        _check_q(df, run, check)
    _check_alerts(df, run, check)
    return check


def _limit_cell(check: RunCheck, net: str) -> str:
    cfg = check.run.config
    if cfg is None:
        return "unknown"
    if cfg.agent.name == "pid":
        return "n/a"
    limit = cfg.agent.clip[net]
    return f"{_fmt(check.after_clip_max.get(net))} / " + ("unclipped" if limit is None else f"{limit:g}")


def _q_cell(check: RunCheck) -> str:
    cfg = check.run.config
    if cfg is None:
        return "unknown"
    return "n/a" if cfg.agent.name == "pid" else f"{_fmt(check.q_abs_max)} / {_fmt(q_bound(cfg))}"


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
