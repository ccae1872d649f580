"""Find run folders and load what the trainer left in them; shared by ``av-td3 validate`` and ``av-td3 compare``.

A run folder is any folder holding ``.hydra/config.yaml`` (a single run, or one job of a sweep). Config,
overrides and summary are small and loaded eagerly; scalars are read on first use, since discovery of a big
sweep should not parse every event file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from av_td3.analysis.events import EVENT_GLOB, find_event_files, is_event_file, read_event_files, read_scalars_csv

# A "running" summary (or none) whose run folder saw no write for this long belongs to a dead process: the
# trainer rewrites scalars.csv / event files at every log interval, far more often than this.
STALE_AFTER_S = 30 * 60
FINISHED = ("completed", "stopped")


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

    @cached_property
    def scalars(self) -> pd.DataFrame:
        """All scalars as ``step, tag, value``: the event files, or ``scalars.csv`` for a CSV-only run."""
        csv = self.path / "scalars.csv"
        if not self.event_files and csv.is_file():
            return read_scalars_csv(csv)
        return read_event_files(self.event_files)

    @property
    def has_scalars(self) -> bool:
        return bool(self.event_files) or (self.path / "scalars.csv").is_file()

    @property
    def seed(self) -> int | None:
        return None if self.config is None else int(self.config.seed)

    @property
    def state(self) -> str:
        """completed | stopped | failed from summary.json; otherwise running (recent writes) or crashed."""
        status = (self.summary or {}).get("status")
        if status in ("completed", "stopped", "failed"):
            return status
        return "running" if time.time() - self._last_write() < STALE_AFTER_S else "crashed"

    @property
    def finished(self) -> bool:
        """Ran to its end or was stopped on purpose (NaN guard, signal): its results count."""
        return self.state in FINISHED

    def _last_write(self) -> float:
        files = [self.path / "summary.json", self.path / "scalars.csv", *self.event_files]
        return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or caught mid-rewrite: treated as no summary
        return None


def load_run(run_dir: Path, root: Path, event_files: list[Path] | None = None) -> Run:
    """Load one run folder; ``event_files`` restricts the scalars to those files (an event file given directly)."""
    hydra = run_dir / ".hydra"
    overrides = hydra / "overrides.yaml"
    return Run(
        path=run_dir,
        name=_relative_name(run_dir, root),
        config=OmegaConf.load(hydra / "config.yaml"),  # type: ignore[arg-type]  # a mapping by contract
        overrides=[str(o) for o in OmegaConf.load(overrides)] if overrides.is_file() else None,  # type: ignore[union-attr]
        summary=_read_json(run_dir / "summary.json"),
        event_files=find_event_files(run_dir) if event_files is None else event_files,
    )


def _relative_name(path: Path, root: Path) -> str:
    return path.name if path == root else str(path.relative_to(root))


def _event_file_run(file: Path, root: Path) -> Run:
    """A run for one event file: its run folder is two levels up (``<run>/tb/events...``) when that has .hydra."""
    run_dir = file.parent.parent
    if (run_dir / ".hydra" / "config.yaml").is_file():
        run = load_run(run_dir, run_dir, event_files=[file])
    else:
        run = Run(path=file.parent, name="", config=None, overrides=None, summary=None, event_files=[file])
    run.name = str(file.relative_to(root)) if root.is_dir() else str(file)
    return run


def find_run_dirs(folder: Path) -> list[Path]:
    """Folders under ``folder`` (itself included) that hold ``.hydra/config.yaml``; a run's own sub-folders
    (checkpoints, tb) are not searched further."""
    found = []
    for dirpath, dirnames, _ in os.walk(folder):
        here = Path(dirpath)
        if (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def find_runs(path: Path) -> list[Run]:
    """Every run at ``path``: a run folder, a folder of runs (a sweep, or several), or one event file.

    A folder with event files but no run folders (a bare TensorBoard log dir) gives one run per event file.
    Raises :class:`RunDiscoveryError` when ``path`` is missing or is a file other than an event file.
    """
    path = Path(path)
    if not path.exists():
        raise RunDiscoveryError(f"{path}: no such file or folder")
    if path.is_file():
        if not is_event_file(path):
            raise RunDiscoveryError(f"{path}: not a run folder, sweep folder or TensorBoard event file")
        return [_event_file_run(path, path)]
    run_dirs = find_run_dirs(path)
    if run_dirs:
        return [load_run(d, path) for d in run_dirs]
    return [_event_file_run(f, path) for f in sorted(path.rglob(EVENT_GLOB)) if f.is_file()]
