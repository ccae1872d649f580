"""The machine and process the numbers come from: what is recorded about them, and the small process-level
helpers every section uses (device sync, silenced loggers)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from av_td3 import machine
from av_td3.machine import cpu_model


def load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on. ``load_avg`` is taken at the start: other busy processes on a small
    machine distort every row (with 2 cores, one busy neighbour halves a 2-thread torch op or worse)."""
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
        "device": str(device), "load_avg_1m_at_start": load_avg(),
        # Thread settings that change every row (OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning).
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                               "KMP_BLOCKTIME", "GOMP_SPINCOUNT")},
        # What malloc does with freed tensor memory: 10-15% of an update's CPU time, more on a loaded machine.
        "freed_memory": machine.freed_memory,
    }
    try:
        import stable_baselines3
        info["stable_baselines3"] = stable_baselines3.__version__
    except ImportError:
        info["stable_baselines3"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A line when other processes were using the CPU as the run started (1-minute load average above 0.5; the
    end value includes this run's own threads), which slows every row and multi-threaded ones most."""
    load = machine.get("load_avg_1m_at_start")
    if load is None or load <= 0.5:
        return None
    return (f"the 1-minute load average was {load:.2f} on {machine.get('logical_cores')} cores when the run started: "
            "other processes were running, which slows every row (multi-threaded torch ops most, as their threads "
            "wait for each other) and makes the rows noisier; rerun on an idle machine, or compare with --threads 1 "
            "or with OMP_WAIT_POLICY=PASSIVE set.")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it (CPU ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence warnings of the given loggers (random data makes the monitor's alerts fire on purpose)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
