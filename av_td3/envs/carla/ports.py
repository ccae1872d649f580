"""Claims on a CARLA server and a Traffic Manager port, held by the process that drives them.

Two trainers on one synchronous server tick each other's world and drive each other's cars, so each env records
the server and Traffic Manager port it drives and warns when another live av-td3 process already does. The claim
files live in a directory private to the user (mode 0700, owned by them, not a link) inside the system temporary
directory, and are written through an exclusively created temporary file and an atomic rename, so no other user
can plant or redirect them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

import psutil

from av_td3.config import ConfigError
from av_td3.rundir import atomic_write_bytes

log = logging.getLogger(__name__)


def server_key(host: str, port: int) -> str:
    """The claim key of a server: its address as resolved here (``localhost`` and ``127.0.0.1`` are one server),
    or the name as given when it does not resolve."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = host
    return f"{address}_{port}"


def claim_dir() -> Path:
    """The user's private claim directory, created on first use."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"av_td3-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid) or info.st_mode & 0o077:
        raise ConfigError(f"{path} (CARLA port claims) is not a private directory of this user: it is a link, "
                          "belongs to someone else, or others may write to it. Remove it (or set TMPDIR to a "
                          "directory of your own) and rerun.")
    return path


def claim_path(key: str) -> Path:
    return claim_dir() / f"carla_{re.sub(r'[^A-Za-z0-9.-]', '_', key)}.lock"


def _read_holder(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd) as f:
        try:
            return int(f.read().strip())
        except ValueError:
            return None


def claim_port(key: str, label: str) -> Path:
    """Record that this process drives ``key`` (a CARLA server, or a Traffic Manager port); warn when another
    live process of ours already does. Returns the claim file, to release with :func:`release_port`."""
    path = claim_path(key)
    holder = _read_holder(path)
    if holder is not None and psutil.pid_exists(holder):
        log.warning("%s is already in use by av-td3 process %d: give each parallel job its own CARLA server "
                    "(env.carla.port) and Traffic Manager port (env.carla.tm_port), see docs/carla.md.",
                    label, holder)
    atomic_write_bytes(path, lambda f: f.write(str(os.getpid()).encode()), durable=False, private=True)
    return path


def release_port(path: Path) -> None:
    """Remove a claim made by this process (a claim since taken over by another process is left alone)."""
    if _read_holder(path) == os.getpid():
        try:
            path.unlink()
        except OSError:
            pass
