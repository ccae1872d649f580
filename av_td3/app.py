"""One job from a composed config to an objective and an exit code, with every failure explained in one
paragraph (no traceback wall for problems the user can fix)."""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from omegaconf import DictConfig

from av_td3.agent.monitor import NonFiniteError
from av_td3.checkpoint import CheckpointError
from av_td3.config import ConfigError, to_config
from av_td3.envs.base import EnvUnavailableError, SimulatorLostError, SimulatorUnusableError
from av_td3.rundir import CHECKPOINT_DIR, FAILED, FAILED_OBJECTIVE, START_FILES, SUMMARY_FILE, read_summary
from av_td3.sweep import completed_objective, record_completed

log = logging.getLogger("av_td3")

EXIT_CONFIG = 2       # bad configuration or checkpoint, or a simulator unusable as configured: fix the input
EXIT_FAILED = 1       # crashed, or the simulator could not be reached
EXIT_NAN_GUARD = 3    # stopped by monitor.nan_policy=stop; interrupted by a signal: 128 + signal number


def run_job(cfg: DictConfig, run_dir: Path, resume_command: str | None = None,
            single_run: bool = False) -> tuple[float, int]:
    """Train one run into ``run_dir``; return (objective, exit code). The objective is always finite.

    ``resume_command``: the command that resumes this run, printed when it stops resumably. ``single_run``: the
    folder is this run's own (not a sweep's job folder, which the sweep's report lists), so an attempt that
    never started training removes it rather than leave a folder that `av-td3 validate` would call crashed."""
    objective, code = _run_job(cfg, run_dir, resume_command)
    if code in (EXIT_CONFIG, EXIT_FAILED) and single_run and _never_trained(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        log.error("nothing was trained: removed its output dir %s", run_dir)
    return objective, code


def _never_trained(run_dir: Path) -> bool:
    if not run_dir.is_dir() or any(p.name not in START_FILES for p in run_dir.iterdir()):
        return False
    if any((run_dir / CHECKPOINT_DIR).glob("*.pt")):
        return False
    summary = read_summary(run_dir)
    if summary is None:
        return True  # failed before run() wrote one (an invalid config)
    return summary.get("status") == FAILED and not summary.get("steps")


def _resume_hint(resume_command: str | None) -> str:
    if resume_command is None:  # a parallel launcher's worker: the sweep's command is not known here
        return "rerun the sweep's command with hydra.sweep.dir=<its sweep dir> to resume."
    return f"rerun the same command to resume, with the run dir added:\n    {resume_command}"


def _run_job(cfg: DictConfig, run_dir: Path, resume_command: str | None) -> tuple[float, int]:
    from av_td3.train import Interrupted, Preempted, run

    try:
        config = to_config(cfg)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return FAILED_OBJECTIVE, EXIT_CONFIG
    # Rerun into the same dir (hydra.sweep.dir= or hydra.run.dir=): a run that completed with this config is
    # not trained again.
    done = completed_objective(config, run_dir)
    if done is not None:
        log.info("already completed, skipping: %s (objective %.3f)", run_dir, done)
        return done, 0
    try:
        summary = run(config, run_dir)
        record_completed(config, run_dir)
        log.info("run completed: %s (objective %.3f)", run_dir, summary.objective)
        return summary.objective, 0
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return FAILED_OBJECTIVE, EXIT_CONFIG
    except EnvUnavailableError as e:
        log.error("simulator unavailable: %s", e)
        return FAILED_OBJECTIVE, EXIT_FAILED
    except SimulatorLostError as e:
        log.error("simulator lost: %s. Once it is back, %s", e, _resume_hint(resume_command))
        return FAILED_OBJECTIVE, EXIT_FAILED
    except SimulatorUnusableError as e:  # the setup must change before a rerun can work, as for a bad config
        log.error("simulator unusable: %s. Once that is fixed, %s", e, _resume_hint(resume_command))
        return FAILED_OBJECTIVE, EXIT_CONFIG
    except NonFiniteError as e:
        log.error("stopped by the NaN guard: %s (see %s)", e, run_dir / SUMMARY_FILE)
        return _objective(run_dir), EXIT_NAN_GUARD
    except Preempted as e:
        log.warning("%s: checkpoint saved in %s; handing over to the launcher, which requeues the job.", e,
                    run_dir / CHECKPOINT_DIR)
        e.requeue(e.signum, None)  # submitit's handler: requeues the job and exits this process
        return _objective(run_dir), 128 + e.signum
    except Interrupted as e:
        log.warning("%s: checkpoint saved in %s; %s", e, run_dir / CHECKPOINT_DIR, _resume_hint(resume_command))
        return _objective(run_dir), 128 + e.signum
    except MemoryError as e:
        log.error("out of memory: %s. Lower agent.buffer_size or agent.batch_size.", e)
        return FAILED_OBJECTIVE, EXIT_FAILED
    except OSError as e:
        log.error("cannot write the run's files (%s). Free disk space or choose another output dir with "
                  "hydra.run.dir=PATH.", e)
        return FAILED_OBJECTIVE, EXIT_FAILED
    except Exception:
        log.error("the run crashed:\n%s", traceback.format_exc())
        return FAILED_OBJECTIVE, EXIT_FAILED


def _objective(run_dir: Path) -> float:
    try:
        return float((read_summary(run_dir) or {})["objective"])
    except (KeyError, TypeError, ValueError):
        return FAILED_OBJECTIVE

