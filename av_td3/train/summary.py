"""What a run records about itself: provenance, the hyper-parameters it is compared by, and the closing of
``summary.json`` (alerts, objective). The file format itself is :mod:`av_td3.rundir`'s."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from av_td3 import machine
from av_td3.agent.base import Health
from av_td3.config import Config
from av_td3.rundir import DIVERGENCE_ALERTS, FAILED, FAILED_OBJECTIVE, Summary

REPO_ROOT = Path(__file__).resolve().parents[2]  # where the git commit is read (a source checkout)


def provenance() -> dict[str, str]:
    """Git commit, package versions, the machine (CPU model and cores), torch's threads and their OpenMP wait
    policy, what malloc does with freed memory (``machine.freed_memory``), recorded with every run: `av-td3
    compare` quotes wall times with them."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "host": platform.node(), "machine": machine.describe(),
            "torch_threads": str(torch.get_num_threads()),
            "omp_wait_policy": os.environ.get(machine.WAIT_POLICY_VAR, "unset"),
            "freed_memory": machine.freed_memory}
    for pkg in ("av-td3", "torch", "numpy", "gymnasium", "highway-env", "hydra-core"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def flat_hparams(cfg: Config) -> dict[str, float | int | str | bool]:
    """The hyper-parameters runs are compared by (TensorBoard HParams tab); null clip → "off"."""
    a, e = cfg.agent, cfg.env
    return {"seed": cfg.seed, "agent": a.name, "encoder": a.encoder, "clip_actor": a.clip.actor or "off",
            "clip_critic": a.clip.critic or "off", "lr_actor": a.lr.actor, "lr_critic": a.lr.critic,
            "policy_freq": a.policy_freq, "tau": a.tau, "gamma": a.gamma, "n_step": a.n_step,
            "batch_size": a.batch_size, "town": e.town, "npcs": e.npcs, "total_steps": cfg.trainer.total_steps}


def objective(summary: Summary, worst_return: float) -> float:
    """Final evaluation return for sweepers; a finite penalty (``worst_return``, the worst possible return) when
    the run had no final evaluation, or was stopped by the NaN guard — whose last evaluation predates the
    divergence, so a search would otherwise favour configs that diverge after a good start. (A NaN objective
    crashes Optuna.)"""
    fe = summary.final_eval
    if fe is not None and math.isfinite(fe["return"]) and not summary.nan_guard["triggered"]:
        return fe["return"]
    return worst_return


def close(summary: Summary, steps: int, wall_s: float, health: Health, worst_return: float) -> None:
    """Fill in what is known only at the end: steps trained, wall time (s), the agent's alerts, the objective."""
    summary.steps = steps
    summary.wall_s = wall_s
    summary.alerts = health.alerts
    summary.divergence_alerts = sum(v for k, v in summary.alerts.items() if k.split("/")[1] in DIVERGENCE_ALERTS)
    summary.skipped_updates = health.skipped_updates
    summary.objective = objective(summary, worst_return)


def failed(cfg: Config, err: BaseException) -> Summary:
    """The summary of an attempt that failed before training: an earlier attempt's must not pass for it."""
    return Summary(status=FAILED, reason=f"{type(err).__name__}: {err}", total_steps=cfg.trainer.total_steps,
                   objective=FAILED_OBJECTIVE)
