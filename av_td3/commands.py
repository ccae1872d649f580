"""Commands printed for the user to copy (resume a run, compare a sweep, add ``-m``).

They are built from how this process was started, with the interpreter exactly as the user typed it (e.g.
``.venv/bin/python``), so they work as printed in the same shell whether or not the venv is activated.
Kept free of torch and pandas: the launcher's pre-checks use it before anything heavy is imported.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def python() -> list[str]:
    """The interpreter and its options as typed (``sys.orig_argv`` minus the script's own arguments)."""
    orig = list(getattr(sys, "orig_argv", []) or [sys.executable])
    n = len(sys.argv)
    prefix = orig[:-n] if n and orig[-n:] == sys.argv else orig[:1]
    return prefix or [sys.executable]


def launched_by_launch_py() -> bool:
    """False in a worker process of a parallel launcher (joblib, submitit), whose argv is not the user's."""
    return bool(sys.argv) and Path(sys.argv[0]).name == "launch.py"


def launch(args: list[str], set_keys: dict[str, str] | None = None, multirun: bool = False) -> str:
    """``<python> launch.py [-m] <args>`` with ``set_keys`` replacing any value the args give for those keys."""
    set_keys = set_keys or {}
    script = sys.argv[0] if launched_by_launch_py() else "launch.py"
    kept = [a for a in args if a.lstrip("+").split("=", 1)[0] not in set_keys
            and not (multirun and a in ("-m", "--multirun"))]
    flags = ["-m"] if multirun else []
    return shlex.join([*python(), script, *flags, *kept, *(f"{k}={v}" for k, v in set_keys.items())])


def cli(*args: str) -> str:
    """``av-td3 <args>``: the ``av-td3`` script next to the typed interpreter, else ``<python> -m av_td3.cli``."""
    interpreter = python()
    script = Path(interpreter[0]).parent / "av-td3"
    if len(interpreter) == 1 and "/" in interpreter[0] and script.exists():
        return shlex.join([str(script), *args])
    return shlex.join([*interpreter, "-m", "av_td3.cli", *args])


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter, and what Hydra's defaults use)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def pip_install(*requirements: str) -> str:
    """``<python> -m pip install <requirements>``: into the environment that runs av-td3, whichever pip is on PATH."""
    return shlex.join([*python(), "-m", "pip", "install", *requirements])
