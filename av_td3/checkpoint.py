"""Crash-safe checkpoints: atomic writes, the last K kept, a ``latest`` pointer, fallback on a bad file.

Checkpoints are data, never code. A checkpoint holds only tensors and plain values (dicts, lists, tuples, str,
int, float, bool, None), so it is read with ``torch.load(weights_only=True)``, which rebuilds exactly those and
refuses anything else: a crafted ``.pt`` file (given to ``trainer.resume`` or left in a run's ``checkpoints/``)
cannot run code when it is read. :func:`plain` converts numpy arrays and scalars on save, and refuses other
objects then, so a checkpoint that could not be read back safely is never written. Files that need a full
unpickle (those of format 1, written before 2026-12, hold numpy arrays) are refused unless the user sets
``trainer.trust_checkpoint=true``.

Writing a checkpoint need not stall training: :meth:`CheckpointManager.save_in_background` compresses and writes
in a background thread, one write at a time, while the caller goes on with copies taken by ``plain(copy=True)``
and :meth:`av_td3.replay.ReplayBuffer.snapshot`; :meth:`CheckpointManager.wait` waits for the file and raises the
error the write failed with in the caller's thread.
"""

from __future__ import annotations

import collections
import logging
import pickle
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from av_td3.rundir import atomic_write_bytes  # the one atomic write of a run folder (re-exported for tests)

log = logging.getLogger(__name__)

# 2: tensors and plain values only (read with weights_only=True), the replay buffer's filled rows compressed.
# 1: numpy arrays and the whole allocated buffer; readable only with trainer.trust_checkpoint=true.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one made for a different configuration. The message says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds Python objects that only a full unpickle rebuilds, and unpickling can run code. Never
    skipped in favour of an older checkpoint: the user decides (delete it, or trust it explicitly)."""


def plain(obj: Any, where: str = "checkpoint", copy: bool = False) -> Any:
    """``obj`` with numpy arrays turned into tensors (same dtype and shape) and numpy scalars into Python ones,
    so that ``torch.load(weights_only=True)`` reads it back; containers left as they are when nothing in them
    changed (a module's state dict keeps its ``_metadata``). ``where`` names the entry in error messages.

    ``copy=True`` takes a snapshot: every tensor cloned (on its own device), every array copied and every
    container rebuilt, so that later in-place changes to ``obj``'s contents (an optimizer step, a training
    step's writes) do not reach the result, which can then be written while training goes on.

    Raises TypeError for any other type: it would make the checkpoint unreadable without a full unpickle."""
    if isinstance(obj, np.generic):  # before the scalars: np.float64 is a float subclass, pickled as numpy's
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, order="C") if copy else np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if copy else obj
    if isinstance(obj, _PLAIN_SCALARS):
        return obj
    if type(obj) in (dict, collections.OrderedDict):
        items = [(plain(k, f"{where} key", copy), plain(v, f"{where}[{k!r}]", copy)) for k, v in obj.items()]
        if not copy and all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, obj.items())):
            return obj
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() versions its modules' entries here
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        items = [plain(v, f"{where}[{i}]", copy) for i, v in enumerate(obj)]
        return obj if not copy and all(v is v0 for v, v0 in zip(items, obj)) else type(obj)(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
                    "tensors, numpy arrays and plain values (dict, list, tuple, str, int, float, bool, None) so "
                    "that it loads without unpickling code: convert it to one of those in its state_dict().")


class CheckpointManager:
    """``<dir>/step_<N>.pt`` files plus a ``latest`` text file naming the newest complete one.

    One writer per directory: :meth:`save` and :meth:`save_in_background` first wait for the write in flight, so
    at most one runs at a time (each also clears the temporary files a killed process left)."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.dir = directory
        self.keep = keep
        self._writing: threading.Thread | None = None
        self._error: BaseException | None = None  # what the last background write failed with, until wait()

    def path(self, step: int) -> Path:
        """The file the checkpoint of env step ``step`` is written to."""
        return self.dir / f"step_{step:010d}.pt"

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` (tensors, numpy arrays and plain values; see :func:`plain`) as ``step_<step>.pt`` now,
        in this thread, after the write in flight (whose error it raises)."""
        self.wait()
        return self._write(state, step)

    def save_in_background(self, make_state: Callable[[], dict], step: int,
                           written: Callable[[Path], Any] = lambda path: None) -> Path:
        """Write ``make_state()`` as ``step_<step>.pt`` in a background thread, then call ``written(path)`` there;
        return the path at once. ``make_state`` runs in that thread while the caller goes on, so it may read only
        what the caller no longer changes (copies). Waits first for the write in flight and raises its error.
        ``latest`` names the new file only once it is complete; :meth:`wait` waits for that."""
        self.wait()
        self._writing = threading.Thread(target=self._write_in_background, args=(make_state, step, written),
                                         name=f"checkpoint-{step}")
        self._writing.start()
        return self.path(step)

    def wait(self) -> None:
        """Block until the background write in flight, if any, is complete; raise the error it failed with (once:
        a failed write is reported to one caller)."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_in_background(self, make_state: Callable[[], dict], step: int, written: Callable[[Path], Any]) -> None:
        try:
            written(self._write(make_state(), step))
        except BaseException as err:  # raised in the caller's thread by wait()
            self._error = err

    def _write(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):  # left by a process killed mid-write; one writer at a time here
            stale.unlink(missing_ok=True)
        safe = plain({"format": FORMAT_VERSION, **state})
        path = self.path(step)
        atomic_write_bytes(path, lambda f: torch.save(safe, f))
        atomic_write_bytes(self.dir / "latest", lambda f: f.write(path.name.encode()))
        for old in self.all()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def all(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.dir.glob("step_*.pt")) if self.dir.is_dir() else []

    def load_latest(self, map_location: torch.device | str = "cpu",
                    trust: bool = False) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; a corrupt one is reported and the previous one used. One that needs
        an unsafe unpickle stops the search (:class:`UnsafeCheckpointError`) unless ``trust``."""
        candidates = self.all()[::-1]
        pointer = self.dir / "latest"
        if pointer.exists():
            named = self.dir / pointer.read_text().strip()
            if named in candidates:  # the pointer first, then older files
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                return load(path, map_location, trust), path
            except UnsafeCheckpointError:
                raise
            except CheckpointError as e:
                log.error("%s — trying the previous checkpoint", e)
        return None


def load(path: Path, map_location: torch.device | str = "cpu", trust: bool = False) -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain values only, no code runs. A file that
    names other Python objects raises :class:`UnsafeCheckpointError`, unless ``trust``
    (``trainer.trust_checkpoint=true``): then it is unpickled in full, which runs whatever code it names."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused the file: unsafe objects, or not a pickle at all
        unsafe = _unsafe_globals(path, e)
        if not unsafe:
            raise _unreadable(path, e) from e
        if not trust:
            raise UnsafeCheckpointError(
                f"checkpoint {path} was not loaded: it names Python objects ({', '.join(unsafe[:6])}) that only "
                "a full unpickle rebuilds, and unpickling runs code named in the file, so a crafted checkpoint "
                "can run any command as you. av-td3 checkpoints written since format 2 hold tensors and plain "
                "values only. If you wrote this file yourself with an older av-td3 (format 1) and trust it, "
                "add trainer.trust_checkpoint=true to load it once; the next checkpoint is written in the safe "
                "format. Otherwise delete it, or start fresh with trainer.resume=none.") from e
        log.warning("trainer.trust_checkpoint=true: unpickling %s in full (it names %s); this runs any code the "
                    "file names", path, ", ".join(unsafe[:6]))
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:
            raise _unreadable(path, e2) from e2
    except Exception as e:  # torch raises several types for truncated or garbled files
        raise _unreadable(path, e) from e
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"checkpoint {path} is not an av-td3 checkpoint of format "
                              f"{' or '.join(map(str, READABLE_FORMATS))}.")
    return state


def _unsafe_globals(path: Path, err: pickle.UnpicklingError) -> list[str]:
    """The Python objects (module.name) a checkpoint's pickle names beyond what weights_only allows, read from its
    opcodes without executing them. Empty when the file is no torch checkpoint at all (garbage, cut short)."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint  # torch >= 2.5
    except ImportError:  # older torch: its refusal names the first such object
        return re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))[:1]
    try:
        return get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: garbage, truncated, or a raw pickle
        return []


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); it is "
                           "corrupt or incomplete. Delete it or point trainer.resume at another checkpoint.")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose network or observation shapes differ from the current configuration."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made with a different configuration ({'; '.join(diffs)}). "
                              "Use the configuration it was made with, or start fresh with trainer.resume=none "
                              "in a new output dir.")
