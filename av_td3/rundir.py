"""The run-folder format, in one place: file names, the ``summary.json`` schema with its writer and reader, run
statuses, finding run folders (and the interrupted run a command could resume), which config keys are run-only,
how an older run's config is read today, the alert vocabulary the verdicts are built on, and the one atomic write.

The trainer writes through this module and every reader (``validate``, ``compare``, ``archive``, the sweep
report, ``launch.py``) reads through it, so the two sides cannot drift apart. Kept free of torch and pandas at
import: Hydra imports the sweep module, and so this one, at the start of every run.

A run folder (live, under ``outputs/``) holds::

    .hydra/config.yaml  .hydra/overrides.yaml   the composed config and the command-line overrides (Hydra's)
    launch.log                                  the run's log (Hydra's job log, named after launch.py)
    summary.json                                status, final evaluation, alert counts, provenance (Summary)
    scalars.csv                                 every scalar as step,tag,value (logger.csv.filename)
    tb/events.out.tfevents.*                    the same scalars for TensorBoard, plus images
    checkpoints/                                resumable state (not read by the analysis)
    completed_config.json                       the config of the attempt that completed (lets a rerun skip it)

A sweep folder holds one such run folder per job (named by its overrides) and, once the sweep ends,
``sweep_summary.json`` (every job's outcome). An archived run (``av-td3 archive``, committed under ``results/``)
keeps only what the analysis needs::

    .hydra/config.yaml  .hydra/overrides.yaml  summary.json  scalars.csv.gz  archive.json
"""

from __future__ import annotations

import functools
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from av_td3.config import RENAMED_KEYS, Config, CsvConfig, renamed_key
from av_td3.config.tree import flatten, schema_fields  # the walkers of values and types (flatten re-exported)
from av_td3.tags import DIVERGENCE, INVARIANT, alerts_of

HYDRA_DIR = ".hydra"
CONFIG_FILE = f"{HYDRA_DIR}/config.yaml"
OVERRIDES_FILE = f"{HYDRA_DIR}/overrides.yaml"
SUMMARY_FILE = "summary.json"
DEFAULT_SCALARS_FILE = CsvConfig().filename  # logger.csv.filename's default (the schema's)
ARCHIVED_SCALARS_FILE = "scalars.csv.gz"   # what an archived run holds instead of scalars.csv and tb/
ARCHIVE_FILE = "archive.json"              # marks an archived run: source, code version, when
TB_DIR = "tb"
EVENT_FILE_PREFIX = "events.out.tfevents."  # TensorBoard's event files in TB_DIR (one more per resume)
CHECKPOINT_DIR = "checkpoints"
LAUNCH_LOG = "launch.log"                  # Hydra's job log: <job name>.log, the job named after launch.py
# The config of the attempt that completed: Hydra rewrites .hydra/config.yaml before every attempt, so that
# file cannot tell whether a rerun asks for the same run.
COMPLETED_CONFIG = "completed_config.json"
SWEEP_SUMMARY = "sweep_summary.json"       # in a sweep folder: every job's outcome, written when the sweep ends
# What a run writes into its folder before and during its start: a folder holding no more than these, and no
# checkpoint, belongs to an attempt that never trained.
START_FILES = frozenset({HYDRA_DIR, LAUNCH_LOG, SUMMARY_FILE, TB_DIR, DEFAULT_SCALARS_FILE, CHECKPOINT_DIR})

# summary.json's status. running: in progress (or its process died: readers tell by the age of the files);
# completed: reached trainer.total_steps; stopped: on purpose (NaN guard, signal, simulator lost); failed: crashed.
RUNNING, COMPLETED, STOPPED, FAILED = "running", "completed", "stopped", "failed"
STATUSES = (RUNNING, COMPLETED, STOPPED, FAILED)
FINISHED = (COMPLETED, STOPPED)  # results that count
# summary.json's objective of a run that produced no evaluation at all (finite: a NaN objective crashes Optuna).
FAILED_OBJECTIVE = -1e9

# Keys that change how a job runs, not what it computes: a sweep rerun that differs only in these still skips,
# and `compare` never splits a group on them.
RUN_ONLY_KEYS = frozenset({"trainer.resume", "trainer.torch_threads", "trainer.progress", "trainer.trust_checkpoint"})
# Config-group choices that select presets rather than name an experiment.
PRESET_CHOICES = frozenset({"experiment", "debug", "launcher", "hydra/launcher", "hparams_search"})
# Overrides that never name a run: left out of a sweep job's folder name (conf/config.yaml's
# hydra.job.config.override_dirname.exclude_keys is this list, tested) and of compare's group labels.
UNNAMED_OVERRIDES = PRESET_CHOICES | RUN_ONLY_KEYS
# Keys that never make two runs different experiments: the seed is pooled by the statistics, the device and
# the loggers and the analysis plan (plan.*) do not change what is computed, the experiment's name is a label.
# trainer.eval_episodes changes how precisely a run is measured, not how it trains (on the embedded simulator the
# training is identical, tests/test_config_effects.py; with CARLA evaluation restarts the training episode either
# way), so runs evaluated on 5 and on 10 episodes pool; compare names such a group.
NOT_EXPERIMENT_KEYS = frozenset({"seed", "trainer.device", "experiment_name", "trainer.eval_episodes"}) | RUN_ONLY_KEYS
NOT_EXPERIMENT_PREFIXES = ("logger.", "plan.")

# Keys added after runs were archived, with the value that reproduces what a run made before the key existed
# (not necessarily today's default): an older run's config is read as if it had set them so.
LEGACY_VALUES: dict[str, Any] = {"agent.clip.mode": "norm", "agent.augment": "none", "env.view": "world",
                                 "agent.clip.zscore_scaling": "threshold"}
# Keys whose shipped default changed after runs were archived, with the day it changed. A run that holds another
# value without asking for it (no override of the key, no config-group choice such as arm=) ran with an older
# default: `compare` adds the key to its group's label (env.view=world), so it is never read as today's default.
DEFAULTS_CHANGED: dict[str, str] = {"env.view": "2026-12-02", "agent.augment": "2026-12-02",
                                    "agent.clip.actor": "2026-12-02", "agent.clip.critic": "2026-12-02"}
# Keys older runs have that the schema no longer knows and that never changed what a run computed (alert
# thresholds of the monitor before the spike detector): dropped on reading, so such runs pool with newer ones.
RETIRED_KEYS = ("monitor.warn_factor", "monitor.critical_factor", "monitor.reference_limit_actor",
                "monitor.reference_limit_critic", "monitor.growth_factor", "monitor.growth_ema")
# Keys that moved are read under today's names (av_td3.config.RENAMED_KEYS: the CARLA backend's env.host, ... are
# env.carla.host, ...), so an old run and a new run of one configuration are one group.

# Alerts (tags alert/<net>/<name>) by severity, from the one table of alerts (av_td3.tags.ALERTS). Numerical
# failure: with the NaN guard and a non-finite logged value, the only grounds on which a run is called diverged.
DIVERGENCE_ALERTS = alerts_of(DIVERGENCE)
# The monitor's own invariant (after-clip norm <= the limit used): firing means a broken clip, not a bad run.
INVARIANT_ALERTS = alerts_of(INVARIANT)


@dataclass
class Summary:
    """``summary.json``: what ``compare`` and the sweep report read instead of re-reading every scalar."""
    status: str = RUNNING                  # one of STATUSES
    reason: str | None = None
    steps: int = 0
    total_steps: int = 0
    final_eval: dict[str, float] | None = None
    alerts: dict[str, int] = field(default_factory=dict)    # "<net>/<alert>" -> flushes where it fired
    divergence_alerts: int = 0             # flushes where a DIVERGENCE_ALERTS alert fired
    nan_guard: dict[str, Any] = field(default_factory=lambda: {"triggered": False, "quantity": None, "step": None})
    skipped_updates: int = 0
    objective: float = 0.0                 # what a sweeper (Optuna) maximises: see objective_is
    objective_is: str | None = None        # what objective is, in words (objective_in_words); absent in older files
    wall_s: float = 0.0
    provenance: dict[str, str] = field(default_factory=dict)  # git commit, package versions, host


def objective_in_words(summary: Summary) -> str:
    """What ``summary.objective`` is: the final evaluation return, the last evaluation's return of a run that
    stopped early, or a penalty (the worst possible return, or FAILED_OBJECTIVE) and why, so that -12400.0 is
    never read as a return a policy achieved."""
    if summary.status == RUNNING:
        return "not yet set: the run is in progress"
    why = f": {summary.reason}" if summary.reason else ""
    last = (summary.final_eval or {}).get("return")
    triggered = summary.nan_guard.get("triggered")
    if last is not None and summary.objective == last and not triggered:  # a NaN return never equals itself
        if summary.status == COMPLETED:
            return "final evaluation return"
        return (f"return of the last evaluation; the run {summary.status} at env step {summary.steps} of "
                f"{summary.total_steps}{why}")
    amount = f"{FAILED_OBJECTIVE:,.0f}" if summary.objective == FAILED_OBJECTIVE else "the worst possible return"
    if triggered:
        cause = f"stopped by the NaN guard{why} (its last evaluation predates the divergence)"
    elif last is None:
        cause = f"no evaluation (the run {summary.status}{why})"
    else:
        cause = "the last evaluation's return is not finite"
    return f"penalty, {amount}: {cause}"


def write_summary(run_dir: Path, summary: Summary) -> None:
    """Write ``summary.json`` atomically (a reader never sees half a file), with ``objective_is`` filled in from
    the rest (:func:`objective_in_words`)."""
    summary.objective_is = objective_in_words(summary)
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(asdict(summary), indent=2))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Callable[[Any], Any], durable: bool = True, private: bool = False) -> None:
    """Write through a temporary file, fsync it, then rename: a crash leaves the old file or the new, never half.
    The one atomic write of the package: run-folder files (summary.json, checkpoints, purged event files and
    CSV) and the CARLA port claims all go through it.

    The temporary file lies next to ``path`` (so the rename stays on one file system) under a random name and
    is created exclusively (O_EXCL: never an existing file or a symlink planted in its place); its mode follows
    the umask, like the file it replaces. ``durable``: also fsync the directory, so the rename itself survives a
    power cut (checkpoints, summary.json); a file that is rebuilt anyway (a purged CSV, a port claim) skips it.
    ``private``: mode 0600 and no symlink followed (a file in a directory other users can see)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (getattr(os, "O_NOFOLLOW", 0) if private else 0)
    fd = os.open(tmp, flags, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # no partial file left behind, e.g. on a full disk
        # torch.save reports a failed write (disk full, quota) as a RuntimeError raised while handling the OSError
        cause = err if isinstance(err, OSError) else err.__context__
        if isinstance(cause, OSError) and cause is not err:
            raise OSError(cause.errno, f"cannot write {path}: {cause.strerror}") from err
        raise
    if durable:
        _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with :func:`atomic_write_bytes` (a reader never sees half a file)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when absent, unreadable, cut short by a killed process or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` as written (a dict: older files lack newer fields); None when there is none yet
    or it cannot be read (see :func:`read_json`)."""
    return read_json(run_dir / SUMMARY_FILE)


def nan_guard_stop(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The NaN guard's record in a run's summary (``quantity``, ``step``) when it stopped the run; None when it
    did not (or there is no summary)."""
    guard = (summary or {}).get("nan_guard") or {}
    return guard if guard.get("triggered") else None


def is_resumable_stop(summary: dict[str, Any] | None) -> bool:
    """Whether a run with this summary was stopped resumably: by a signal, a time-out or a lost simulator, not by
    the NaN guard (resuming would diverge again)."""
    return summary is not None and summary.get("status") == STOPPED and nan_guard_stop(summary) is None


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def find_run_dirs(folder: Path) -> list[Path]:
    """Folders under ``folder`` (itself included) that hold ``.hydra/config.yaml``; a run's own sub-folders
    (checkpoints, tb) are not searched further."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def without_run_only(overrides: list[str]) -> list[str]:
    """Command-line overrides, sorted, without those of :data:`RUN_ONLY_KEYS`: what makes two commands one run."""
    return sorted(o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in RUN_ONLY_KEYS)


def interrupted_run(runs_root: Path, overrides: list[str]) -> tuple[Path, int] | None:
    """The newest run in ``runs_root`` (Hydra's ``<date>/<time>`` folders) that was stopped resumably
    (:func:`is_resumable_stop`) with the same overrides, run-only keys aside; and its step."""
    wanted = without_run_only(overrides)
    for summary_file in sorted(runs_root.glob(f"*/*/{SUMMARY_FILE}"), reverse=True):  # newest first
        run = summary_file.parent
        summary = read_summary(run)
        if not is_resumable_stop(summary):
            continue
        try:
            used = [str(o) for o in OmegaConf.load(run / OVERRIDES_FILE)]
        except (OSError, ValueError, yaml.YAMLError):  # cut short by a killed process: not a candidate
            continue
        if without_run_only(used) == wanted:
            return run, int(summary.get("steps") or 0)  # type: ignore[union-attr]
    return None


def is_archived(path: Path) -> bool:
    return (path / ARCHIVE_FILE).is_file()


def scalars_file(run_dir: Path, config: DictConfig | None) -> Path | None:
    """The run's step,tag,value table: the archive's compressed copy, or the CSV the run's config names."""
    archived = run_dir / ARCHIVED_SCALARS_FILE
    if archived.is_file():
        return archived
    name = DEFAULT_SCALARS_FILE
    csv = None if config is None else OmegaConf.select(config, "logger.csv")
    if csv is not None and csv.get("filename"):
        name = str(csv.filename)
    path = run_dir / name
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------- configs
def _schema_defaults() -> dict[str, Any]:
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    assert isinstance(defaults, dict), "a structured config is a mapping"
    return {str(k): v for k, v in defaults.items()}


def read_config(run_dir: Path) -> DictConfig:
    """A run's ``.hydra/config.yaml`` as today's code reads it: moved keys take their new names
    (:data:`av_td3.config.RENAMED_KEYS`), keys the run predates take their :data:`LEGACY_VALUES` value, or else the
    schema's default (analysis keys such as ``monitor.collapse_fraction``), so runs from different code versions
    compare key by key. :data:`RETIRED_KEYS` are dropped; other keys the schema no longer has are kept (they tell
    runs apart)."""
    return read_config_and_keys(run_dir)[0]


def read_config_and_keys(run_dir: Path) -> tuple[DictConfig, frozenset[str]]:
    """:func:`read_config`, and the dotted keys the file itself holds under today's names (not those filled in for
    a run that predates them): what the run was really configured with. The file is parsed once."""
    loaded = OmegaConf.load(run_dir / CONFIG_FILE)
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{run_dir / CONFIG_FILE}: not a mapping")
    config = upgrade_config(loaded)  # renames and drops retired keys in ``loaded`` itself
    return config, frozenset(flatten(loaded))


def schema_default(key: str) -> Any:
    """Today's default of a dotted key (the schema is the single source of defaults)."""
    return _flat_defaults().get(key)


@functools.lru_cache(maxsize=1)
def _flat_defaults() -> dict[str, Any]:
    return flatten(_schema_defaults())


def upgrade_config(loaded: DictConfig) -> DictConfig:
    """A config recorded by any code version, as today's code reads it (see :func:`read_config`); ``loaded`` is
    changed in place (renamed and retired keys) and the merged config returned."""
    _rename_keys(loaded)
    for key in RETIRED_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(loaded, parent)
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    base = OmegaConf.create(_schema_defaults())
    for key, value in LEGACY_VALUES.items():
        if OmegaConf.select(loaded, key, default=_MISSING) is _MISSING:
            OmegaConf.update(base, key, value, force_add=True)
    merged = OmegaConf.merge(base, loaded)
    assert isinstance(merged, DictConfig)
    return merged


_MISSING = object()


def renamed_override(override: str) -> str:
    """A recorded command-line override under today's key names (``env.port=2004`` -> ``env.carla.port=2004``),
    so an old run's label matches a new run's; anything else is returned as it is."""
    key, sep, value = override.partition("=")
    bare = key.lstrip("+~")
    new = renamed_key(bare) if sep else None
    return f"{key[:len(key) - len(bare)]}{new}={value}" if new else override


def _rename_keys(loaded: DictConfig) -> None:
    """Move each key of :data:`av_td3.config.RENAMED_KEYS` the config has to its new name, in place (a value the
    config also holds under the new name wins)."""
    for old, new in RENAMED_KEYS.items():
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(loaded, parent) if parent else loaded
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        value = node.pop(leaf)
        if OmegaConf.select(loaded, new, default=_MISSING) is _MISSING:
            OmegaConf.update(loaded, new, value, force_add=True)


def without_other_backends(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened run config without the own sections of the backends it does not use (``env.carla.*`` of an
    ``env.name=highway`` run): the run never read them, so two runs that differ only there (a CARLA default changed
    between them) are one experiment. A backend's section is named as its ``env.name`` (tested against
    :mod:`av_td3.envs.backends`)."""
    chosen = flat.get("env.name")
    unread = tuple(f"env.{name}." for name in _backend_names() if name != chosen)
    return {k: v for k, v in flat.items() if not k.startswith(unread)}


@functools.lru_cache(maxsize=1)
def _backend_names() -> tuple[str, ...]:
    """``env.name``'s choices, read through the one walker of the schema's types."""
    return next(f.metadata["choices"] for f in schema_fields(Config) if f.key == "env.name")


def is_experiment_key(key: str) -> bool:
    """Whether two runs that differ in ``key`` are different experiments (see NOT_EXPERIMENT_KEYS)."""
    return key not in NOT_EXPERIMENT_KEYS and not key.startswith(NOT_EXPERIMENT_PREFIXES)


def code_version(summary: dict[str, Any] | None, archive: dict[str, Any] | None = None) -> str | None:
    """The git commit a run was trained with, from its summary's provenance or its archive record; None if unknown."""
    version = ((summary or {}).get("provenance") or {}).get("git_commit") or (archive or {}).get("code_version")
    return str(version) if version else None


# ----------------------------------------------------------------------------------------------------- safety
def check_inside(root: Path, path: Path) -> None:
    """Refuse ``path`` when it resolves outside ``root`` (a symlink out of a run folder or archive, or a ``..``):
    what ``validate``, ``compare`` and ``archive`` read must be the folder they were given."""
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{path}: resolves to {real}, outside {root}; refusing to read it (a symlink or "
                              "'..' out of the folder given). Copy the files in, or give the folder they are in.")


class UnsafePathError(ValueError):
    """A file of a run folder resolves outside the folder that was given."""
