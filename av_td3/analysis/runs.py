"""Find run folders and load what the trainer left in them; shared by ``av-td3 validate``, ``compare`` and
``archive``. The format itself (file names, statuses, how an older config is read) is :mod:`av_td3.rundir`'s.

A run folder is any folder holding ``.hydra/config.yaml`` (a single run, one job of a sweep, or an archived run).
Config, overrides and summary are small and loaded eagerly; scalars are read on first use, since discovery of a
big sweep should not parse every event file. Every file read must lie inside the folder given (no symlink out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from av_td3 import rundir
from av_td3.analysis.events import EVENT_GLOB, find_event_files, is_event_file, read_event_files, read_scalars_csv
from av_td3.rundir import COMPLETED, FAILED, FINISHED, RUNNING, STOPPED, UnsafePathError, find_run_dirs

# A run's state as compare reads it: its summary.json status, or CRASHED for a "running" one whose process is gone.
CRASHED = "crashed"
# A "running" summary (or none) whose run folder saw no write for this long belongs to a dead process: the
# trainer rewrites scalars.csv / event files at every log interval, far more often than this.
STALE_AFTER_S = 30 * 60


class RunDiscoveryError(ValueError):
    """The given path is not something runs can be found in; the message names the path."""


@dataclass
class Run:
    path: Path                      # the run folder (for a bare event file: the folder holding it)
    name: str                       # path relative to the folder searched, for tables
    config: DictConfig | None       # None: no .hydra/config.yaml, so limits and bounds are unknown
    overrides: list[str] | None     # None: no .hydra/overrides.yaml
    summary: dict[str, Any] | None  # None: no (readable) summary.json
    event_files: list[Path] = field(default_factory=list)
    archive: dict[str, Any] | None = None  # archive.json of an archived run
    # the dotted keys the run's own config file holds (today's names), before the keys it predates are filled in
    recorded_keys: frozenset[str] = frozenset()

    @cached_property
    def scalars(self) -> pd.DataFrame:
        """All scalars as ``step, tag, value``: the event files, or the scalars CSV for a CSV-only or archived run."""
        csv = self.scalars_file
        if not self.event_files and csv is not None:
            return read_scalars_csv(csv)
        return read_event_files(self.event_files)

    @property
    def known_config(self) -> DictConfig:
        """The config of a run that has one: grouping, comparing and archiving read only those (they leave out
        runs without ``.hydra/config.yaml`` first). Raises ValueError naming the run folder otherwise."""
        if self.config is None:
            raise ValueError(f"{self.path}: no .hydra/config.yaml, so this run cannot be grouped or compared")
        return self.config

    @property
    def scalars_file(self) -> Path | None:
        return rundir.scalars_file(self.path, self.config)

    @property
    def records_plan(self) -> bool:
        """Whether the run recorded the analysis plan in force when it started (``plan.*`` in its config; runs
        made before plans existed do not)."""
        return any(k.startswith("plan.") for k in self.recorded_keys)

    @property
    def presets(self) -> set[str]:
        """The preset choices the run was launched with (``debug=smoke``, ...), the experiment and the launcher
        aside: those name the study and where it ran, never a difference in what the runs compute."""
        def kept(key: str) -> bool:
            return key in rundir.PRESET_CHOICES and key != "experiment" and not key.endswith("launcher")

        return {o.lstrip("+") for o in (self.overrides or []) if kept(o.lstrip("+").partition("=")[0])}

    @property
    def has_scalars(self) -> bool:
        return bool(self.event_files) or self.scalars_file is not None

    @property
    def code_version(self) -> str | None:
        return rundir.code_version(self.summary, self.archive)

    @property
    def seed(self) -> int | None:
        return None if self.config is None else int(self.config.seed)

    @property
    def state(self) -> str:
        """completed | stopped | failed from summary.json; otherwise running (recent writes) or crashed."""
        status = (self.summary or {}).get("status")
        if status in (COMPLETED, STOPPED, FAILED):
            return status
        if self.archive is not None:  # an archive is never still running
            return CRASHED
        return RUNNING if time.time() - self._last_write() < STALE_AFTER_S else CRASHED

    @property
    def finished(self) -> bool:
        """Ran to its end, or the NaN guard stopped it: its results count. A run stopped resumably (a signal, a
        time-out, a lost simulator) has not reached its end and does not count until it is resumed."""
        return self.state in FINISHED and not self.resumable_stop

    @property
    def resumable_stop(self) -> bool:
        return rundir.is_resumable_stop(self.summary)

    def _last_write(self) -> float:
        files = [self.path / rundir.SUMMARY_FILE, self.scalars_file, *self.event_files]
        return max((f.stat().st_mtime for f in files if f is not None and f.exists()), default=0.0)


def load_run(run_dir: Path, root: Path, event_files: list[Path] | None = None) -> Run:
    """Load one run folder; ``event_files`` restricts the scalars to those files (an event file given directly).
    Raises :class:`~av_td3.rundir.UnsafePathError` when a file it would read lies outside ``root``."""
    overrides = run_dir / rundir.OVERRIDES_FILE
    events = find_event_files(run_dir) if event_files is None else event_files
    for path in (run_dir, run_dir / rundir.CONFIG_FILE, overrides, run_dir / rundir.SUMMARY_FILE,
                 run_dir / rundir.ARCHIVE_FILE, run_dir / rundir.DEFAULT_SCALARS_FILE,
                 run_dir / rundir.ARCHIVED_SCALARS_FILE, *events):
        if path.exists() or path.is_symlink():
            rundir.check_inside(root, path)
    config, recorded = rundir.read_config_and_keys(run_dir)
    csv = rundir.scalars_file(run_dir, config)
    if csv is not None:
        rundir.check_inside(root, csv)
    return Run(
        path=run_dir,
        name=_relative_name(run_dir, root),
        config=config,
        overrides=([rundir.renamed_override(str(o)) for o in OmegaConf.load(overrides)]
                   if overrides.is_file() else None),
        summary=rundir.read_summary(run_dir),
        event_files=events,
        archive=rundir.read_json(run_dir / rundir.ARCHIVE_FILE),
        recorded_keys=recorded,
    )


def _relative_name(path: Path, root: Path) -> str:
    return path.name if path == root else str(path.relative_to(root))


def _event_file_run(file: Path, root: Path) -> Run:
    """A run for one event file: its run folder is two levels up (``<run>/tb/events...``) when that has .hydra."""
    run_dir = file.parent.parent
    if rundir.is_run_dir(run_dir):
        run = load_run(run_dir, run_dir, event_files=[file])
    else:
        run = Run(path=file.parent, name="", config=None, overrides=None, summary=None, event_files=[file])
    run.name = str(file.relative_to(root)) if root.is_dir() else str(file)
    return run


def find_runs(path: Path) -> list[Run]:
    """Every run at ``path``: a run folder, a folder of runs (a sweep, or several), or one event file.

    A folder with event files but no run folders (a bare TensorBoard log dir) gives one run per event file.
    Raises :class:`RunDiscoveryError` when ``path`` is missing or is a file other than an event file.
    """
    path = Path(path)
    if not path.exists():
        raise RunDiscoveryError(f"{path}: no such file or folder")
    try:
        return _find_runs(path)
    except UnsafePathError as e:
        raise RunDiscoveryError(str(e)) from e


def _find_runs(path: Path) -> list[Run]:
    if path.is_file():
        if not is_event_file(path):
            raise RunDiscoveryError(f"{path}: not a run folder, sweep folder or TensorBoard event file")
        return [_event_file_run(path, path)]
    run_dirs = find_run_dirs(path)
    if run_dirs:
        return [load_run(d, path) for d in run_dirs]
    return [_event_file_run(f, path) for f in sorted(path.rglob(EVENT_GLOB)) if f.is_file()]
