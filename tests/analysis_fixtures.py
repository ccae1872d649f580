"""Fake run folders laid out as the trainer writes them (``.hydra/``, ``tb/`` events, ``summary.json``), for the
validate and compare tests. Scalars are ``{tag: [(step, value), ...]}``; :func:`healthy_scalars` gives a run that
passes every check, and tests break one thing in it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from av_td3.config import Config
from av_td3.tags import ALERTS

Scalars = dict[str, list[tuple[int, float]]]
NETS = ("actor", "critic")
# Used as the scale of an unclipped net's norms.
REFERENCE = {"actor": 1.0, "critic": 10.0}


def make_config(overrides: Sequence[str] = (), seed: int = 0) -> DictConfig:
    """The schema's defaults with the config-path overrides applied (``experiment=``/``debug=`` choices name
    files that the schema alone cannot apply, so they only appear in overrides.yaml)."""
    cfg = OmegaConf.structured(Config)
    cfg.merge_with_dotlist([o.lstrip("+") for o in overrides if "." in o.partition("=")[0]])
    for o in overrides:  # agent=pid selects conf/agent/pid.yaml, which names the agent
        if o.startswith("agent="):
            cfg.agent.name = o.partition("=")[2]
    cfg.seed = seed
    return cfg


def healthy_scalars(cfg: DictConfig, flushes: int = 6, log_every: int = 50, final_return: float = 100.0,
                    level: float | None = None) -> Scalars:
    """Scalars of a run that passes validation: norms clipped to exactly the limit, both nets updating, no
    alerts, Q well inside the bound, an evaluation at every flush ramping up to ``final_return``. ``level``:
    instead, evaluations at ``level - 80`` in the first half of the flushes and at ``level`` in the second (the
    late window of a run of ``flushes * log_every`` steps), so the run's late_return and final return are
    ``level`` and it learned (gain 80 > monitor.learn_min_gain)."""
    s: Scalars = {}

    def log(tag: str, step: int, value: float) -> None:
        s.setdefault(tag, []).append((step, float(value)))

    for k in range(1, flushes + 1):
        step = k * log_every
        for net in NETS:
            limit = cfg.agent.clip[net]
            scale = REFERENCE[net] if limit is None else limit
            parts = {"cnn": 1.2 * scale, "mlp": 1.6 * scale, "total": 2.0 * scale}  # cnn^2 + mlp^2 = total^2
            if net == "actor" and cfg.agent.encoder == "shared":
                del parts["cnn"]
            coef = 1.0 if limit is None else limit / parts["total"]
            for part, norm in parts.items():
                log(f"grad/{net}/{part}/before_clip", step, norm)
                log(f"grad/{net}/{part}/before_clip_max", step, 1.5 * norm)
                log(f"grad/{net}/{part}/after_clip", step, norm * coef)
                log(f"grad/{net}/{part}/after_clip_max", step, 1.5 * norm if limit is None else norm / parts["total"]
                    * limit)
            log(f"grad/{net}/clip_coef", step, coef)
            log(f"grad/{net}/clip_fraction", step, 0.0 if limit is None else 0.5)
            log(f"grad/{net}/updates", step, log_every if net == "critic" else log_every // cfg.agent.policy_freq)
            log(f"grad/{net}/spikes", step, 0)
            for q, f in ((50, 0.9), (90, 1.3), (99, 1.45)):
                log(f"grad/{net}/total/before_clip_p{q}", step, f * parts["total"])
            if limit is not None:
                log(f"grad/{net}/clip_limit", step, limit)
                log(f"grad/{net}/clip_limit_max", step, limit)
                log(f"grad/{net}/after_over_limit_max", step, 1.0)
            for alert in ALERTS:
                if net in alert.nets:
                    log(f"alert/{net}/{alert.name}", step, 0)
        for tag, value in (("train/critic_loss", 1.0), ("train/actor_loss", -5.0), ("train/q1", 5.0),
                           ("train/q2", 5.1), ("train/q_abs_max", 8.0), ("perf/steps_per_s", 100.0)):
            log(tag, step, value)
        log("episode/return", step, final_return * k / flushes - 1)
        log("eval/return", step, final_return * k / flushes if level is None else
            level - (80.0 if 2 * k <= flushes else 0.0))
        log("eval/success_rate", step, 0.5)
        log("eval/collisions", step, 0.2)
        log("eval/lane_invasions", step, 1.0)
    return s


def write_events(tb_dir: Path, scalars: Scalars, walltime: float | None = None) -> Path:
    """One event file holding ``scalars`` (each call writes a new file, like a resumed run does)."""
    before = set(tb_dir.glob("events.out.tfevents.*"))
    writer = SummaryWriter(str(tb_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step, walltime=walltime)
    writer.close()
    (new,) = set(tb_dir.glob("events.out.tfevents.*")) - before
    return new


def write_csv(path: Path, scalars: Scalars) -> None:
    rows = ["step,tag,value"] + [f"{step},{tag},{value}" for tag, pts in scalars.items() for step, value in pts]
    path.write_text("\n".join(rows) + "\n")


def default_summary(cfg: DictConfig, scalars: Scalars) -> dict[str, Any]:
    last = {f: scalars[f"eval/{f}"][-1][1] for f in ("return", "success_rate", "collisions", "lane_invasions")
            if f"eval/{f}" in scalars}
    steps = max((pts[-1][0] for pts in scalars.values() if pts), default=0)
    return {"status": "completed", "reason": None, "steps": steps, "total_steps": steps,
            "final_eval": last or None, "alerts": {}, "divergence_alerts": 0,
            "nan_guard": {"triggered": False, "quantity": None, "step": None}, "skipped_updates": 0,
            "objective": last.get("return", 0.0), "wall_s": 1.0}


def write_run(run_dir: Path, overrides: Sequence[str] = (), seed: int = 0, scalars: Scalars | None = None,
              summary: dict[str, Any] | None = None, write_summary: bool = True, events: bool = True,
              csv: bool = False, stale: bool = False) -> Path:
    """Write a fake run folder and return it.

    ``overrides``: command-line overrides (``seed=<seed>`` is added); the config-path ones are applied to the
    config. ``summary``: keys replacing those of a completed run's summary. ``stale``: date every file an hour
    back, as a crashed run would have left them.
    """
    cfg = make_config(overrides, seed)
    scalars = healthy_scalars(cfg) if scalars is None else scalars
    if not any(o.startswith("trainer.total_steps=") for o in overrides):  # the run's length: its last step
        cfg.trainer.total_steps = max((pts[-1][0] for pts in scalars.values() if pts), default=1)
    if not any(o.startswith("trainer.learning_starts=") for o in overrides):  # learning from the first log step
        cfg.trainer.learning_starts = min((pts[0][0] for pts in scalars.values() if pts), default=0)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create([*overrides,
                                                                                            f"seed={seed}"])))
    if events:
        write_events(run_dir / "tb", scalars)
    if csv:
        write_csv(run_dir / "scalars.csv", scalars)
    if write_summary:
        (run_dir / "summary.json").write_text(json.dumps({**default_summary(cfg, scalars), **(summary or {})}))
    if stale:
        old = os.path.getmtime(run_dir) - 3600
        for f in run_dir.rglob("*"):
            os.utime(f, (old, old))
    return run_dir


def job_dir_name(overrides: Sequence[str], seed: int) -> str:
    """Hydra's sweep sub-folder name: sorted overrides without the excluded keys."""
    kept = [o for o in overrides if o.partition("=")[0] not in ("experiment", "debug")]
    return ",".join(sorted([*kept, f"seed={seed}"]))


def write_sweep(sweep_dir: Path, jobs: Sequence[tuple[Sequence[str], int]], **kwargs: Any) -> Path:
    """A multirun folder with one job per ``(overrides, seed)``; ``kwargs`` go to every :func:`write_run`."""
    for overrides, seed in jobs:
        write_run(sweep_dir / job_dir_name(overrides, seed), overrides, seed, **kwargs)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir
