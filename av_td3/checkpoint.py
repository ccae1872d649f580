"""Crash-safe checkpoints: atomic writes, the last K kept, a ``latest`` pointer, fallback on a bad file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one made for a different configuration. The message says what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temporary file, fsync it, then rename: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
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
    _fsync_dir(path.parent)


class CheckpointManager:
    """``<dir>/step_<N>.pt`` files plus a ``latest`` text file naming the newest complete one."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = directory
        self.keep = keep

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:010d}.pt"
        atomic_write_bytes(path, lambda f: torch.save({"format": FORMAT_VERSION, **state}, f))
        atomic_write_bytes(self.dir / "latest", lambda f: f.write(path.name.encode()))
        for old in self.all()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def all(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.dir.glob("step_*.pt")) if self.dir.is_dir() else []

    def load_latest(self, map_location: torch.device | str = "cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; a corrupt one is reported and the previous one used."""
        candidates = self.all()[::-1]
        pointer = self.dir / "latest"
        if pointer.exists():
            named = self.dir / pointer.read_text().strip()
            if named in candidates:  # the pointer first, then older files
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                return load(path, map_location), path
            except CheckpointError as e:
                log.error("%s — trying the previous checkpoint", e)
        return None


def load(path: Path, map_location: torch.device | str = "cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated or garbled files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                              "incomplete. Delete it or point trainer.resume at another checkpoint.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not an av-td3 checkpoint of format {FORMAT_VERSION}.")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose network or observation shapes differ from the current configuration."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made with a different configuration ({'; '.join(diffs)}). "
                              "Use the configuration it was made with, or start fresh with trainer.resume=none "
                              "in a new output dir.")
