"""Sweep support: the sweep folder printed at the start and the end-of-sweep report of jobs that did not complete
(a Hydra callback, registered under ``hydra.callbacks`` in conf/config.yaml), and the check that lets a rerun of a
sweep skip its completed jobs.

Kept free of torch and pandas at import: Hydra imports this module at the start of every run, single ones too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from av_td3 import commands
from av_td3.config import Config
from av_td3.rundir import (COMPLETED, COMPLETED_CONFIG, LAUNCH_LOG, RUN_ONLY_KEYS, RUNNING, SUMMARY_FILE, SWEEP_SUMMARY,
                           UnsafePathError, check_inside, find_run_dirs, flatten, read_json, read_summary,
                           upgrade_config, write_text_atomic)

log = logging.getLogger("av_td3")

# Exit status of a sweep in which some job did not complete.
EXIT_SWEEP_INCOMPLETE = 1
# Launcher presets whose Hydra plugin is an optional install: preset name -> (plugin module, pip package).
OPTIONAL_LAUNCHERS = {"ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher")}


class SweepIncomplete(SystemExit):
    """The end-of-sweep exit when a job did not complete: a type of its own, because launch.py maps Hydra's other
    exits with code 1 (configuration mistakes it reported) to 2."""

    def __init__(self) -> None:
        super().__init__(EXIT_SWEEP_INCOMPLETE)


def _config_record(config: Config) -> dict[str, Any]:
    # Through JSON, so a fresh config and one read back from disk compare equal.
    return json.loads(json.dumps(dataclasses.asdict(config)))


# ------------------------------------------------------------------------------------------ skip on rerun
def record_completed(config: Config, run_dir: Path) -> None:
    """Remember the config a run completed with, for :func:`completed_objective` on a later rerun."""
    # atomic: a rerun that finds a half-written record would fail to read it instead of skipping the job
    write_text_atomic(run_dir / COMPLETED_CONFIG, json.dumps(_config_record(config), indent=2))


def completed_objective(config: Config, run_dir: Path) -> float | None:
    """The objective of an earlier attempt that completed in ``run_dir`` with this config (keys in
    RUN_ONLY_KEYS aside); None when the job must train, which with ``trainer.resume=auto`` resumes from the run's
    latest checkpoint. Only ``trainer.resume=auto`` skips: ``none`` or a checkpoint path asks for training."""
    if config.trainer.resume != "auto":
        return None
    summary = read_summary(run_dir)
    if summary is None or summary.get("status") != COMPLETED:
        return None
    objective = summary.get("objective")
    done = read_json(run_dir / COMPLETED_CONFIG)
    if done is None or not isinstance(objective, (int, float)) or not math.isfinite(objective):
        log.info("%s: summary.json says completed but %s or the objective is missing; training again",
                 run_dir, COMPLETED_CONFIG)
        return None
    # the recorded config as today's code reads it: a key added since the run completed takes the value the run
    # ran with (rundir.LEGACY_VALUES, else the default), a moved key its new name, so neither counts as a change
    old, new = flatten(upgrade_config(OmegaConf.create(done))), flatten(_config_record(config))
    changed = sorted(k for k in old.keys() | new.keys() if k not in RUN_ONLY_KEYS and old.get(k) != new.get(k))
    if changed:
        log.info("%s completed with a different config (%s); training again", run_dir, ", ".join(changed))
        return None
    return float(objective)


# ------------------------------------------------------------------------------------------ sweep report
# A job's status in the sweep report when it has no summary.json to give one: none was written, or the job's
# summary.json resolves outside the sweep folder (rundir.check_inside).
NO_SUMMARY, REFUSED = "no summary", "refused"


@dataclass
class JobResult:
    job: str                  # the job's folder relative to the sweep dir (named by its overrides)
    status: str               # a summary.json status (rundir.STATUSES), or NO_SUMMARY or REFUSED
    steps: int | None
    total_steps: int | None
    objective: float | None
    reason: str | None
    objective_is: str | None = None  # what objective is (summary.json's objective_is; absent in older summaries)


def read_job(job_dir: Path, sweep_dir: Path) -> JobResult:
    """One job's outcome from its summary.json, with a reason for every job that did not complete."""
    name = str(job_dir.relative_to(sweep_dir))
    try:
        check_inside(sweep_dir, job_dir / SUMMARY_FILE)
    except UnsafePathError as e:
        return JobResult(name, REFUSED, None, None, None, str(e))
    summary = read_summary(job_dir)
    if summary is None:
        return JobResult(name, NO_SUMMARY, None, None, None,
                         f"no {SUMMARY_FILE}: the job failed before training started (see its {LAUNCH_LOG})")
    status = summary.get("status", RUNNING)
    reason = summary.get("reason")
    if status == RUNNING:  # the sweep is over, so the job's process died without writing its outcome
        reason = "summary.json still says running: the job's process was killed (out of memory? time limit?)"
    return JobResult(name, status, summary.get("steps"), summary.get("total_steps"), summary.get("objective"),
                     reason, summary.get("objective_is"))


def collect(sweep_dir: Path) -> list[JobResult]:
    """Every job folder under ``sweep_dir`` (the folders `av-td3 compare` reads), earlier runs' included."""
    return [read_job(d, sweep_dir) for d in find_run_dirs(sweep_dir)]


def compare_command(sweep_dir: Path, baseline: str | None = None) -> str:
    """``av-td3 compare <sweep_dir>``, with ``--baseline <label>`` when the experiment declares ``plan.baseline``
    (compare would use it anyway; printed, the reader sees what the arms are compared with)."""
    return commands.cli("compare", str(sweep_dir), *(("--baseline", baseline) if baseline else ()))


def report(sweep_dir: Path, jobs: list[JobResult], baseline: str | None = None) -> str:
    """The text printed at the end of a sweep: a count, a table of the jobs that did not complete, and the compare
    command (with the experiment's ``plan.baseline``, when it declares one)."""
    failed = [j for j in jobs if j.status != COMPLETED]
    compare = compare_command(sweep_dir, baseline)  # as this process was started, so it works as printed
    if not jobs:
        return (f"Sweep {sweep_dir}: no job folder found there. Jobs write their folders at hydra.sweep.dir as "
                "resolved where they run: on a Ray or SLURM cluster, give an absolute hydra.sweep.dir on a "
                "filesystem every node shares (docs/scale-out.md).")
    if not failed:
        return f"Sweep {sweep_dir}: all {len(jobs)} jobs completed. Compare them:\n    {compare}"
    lines = [f"Sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed; "
             f"{len(failed)} did not:", "", "| job | status | steps | reason |", "|---|---|---|---|"]
    for j in failed:
        steps = "-" if j.steps is None else f"{j.steps}/{j.total_steps}"
        reason = (j.reason or "-").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {j.job} | {j.status} | {steps} | {reason} |")
    lines += ["", f"Details in {sweep_dir / SWEEP_SUMMARY} and each job's {SUMMARY_FILE} and {LAUNCH_LOG}. Runs "
              f"stopped by the NaN guard still count in `{compare}` (as diverged). Rerun the same command with "
              f"hydra.sweep.dir={sweep_dir} to skip the completed jobs and retry the others."]
    return "\n".join(lines)


class SweepSummary(Callback):
    """A multirun's bookends. At the start: print the sweep folder, before the first job (the basic launcher names
    no folder, and the jobs' own lines name only their sub-folders). At the end: print :func:`report`, write
    ``<sweep dir>/sweep_summary.json``, and exit with EXIT_SWEEP_INCOMPLETE when a job did not complete (jobs
    themselves return their objective in a sweep, so without this a failed job would leave the exit status 0)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"Sweep {config.hydra.sweep.dir}: one folder per job in it; a report of the jobs when all have run.",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        baseline = OmegaConf.select(config, "plan.baseline")
        jobs = collect(sweep_dir)
        failed = [j.job for j in jobs if j.status != COMPLETED]
        if not jobs:
            print(report(sweep_dir, jobs), flush=True)
            raise SweepIncomplete()
        record = {"sweep_dir": str(sweep_dir), "jobs": len(jobs), "completed": len(jobs) - len(failed),
                  "not_completed": failed, "results": [dataclasses.asdict(j) for j in jobs]}
        write_text_atomic(sweep_dir / SWEEP_SUMMARY, json.dumps(record, indent=2))
        print(report(sweep_dir, jobs, baseline), flush=True)
        if failed:
            # SystemExit passes through Hydra's error handler (it catches Exception): a plain non-zero exit.
            raise SweepIncomplete()


# --------------------------------------------------------------------------------- optional launcher plugins
def missing_launcher_plugin(overrides: list[str]) -> str | None:
    """An error naming the pip package when ``launcher=<preset>`` needs a plugin that is not installed, else
    None. Hydra's own error ("Could not find 'hydra/launcher/ray'") does not say what to install."""
    for preset, (module, package) in OPTIONAL_LAUNCHERS.items():
        if f"launcher={preset}" in overrides and importlib.util.find_spec(module) is None:
            return (f"launcher={preset} needs the Hydra plugin {package}, in the cluster extra: "
                    f"{commands.pip_install('.[cluster]')} (from the repository root), or "
                    f"{commands.pip_install(package)}")
    return None
