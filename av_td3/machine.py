"""The machine a number comes from, in words: recorded with every run (summary.json's provenance) and every
bench, so wall times and speeds are never quoted without it."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """e.g. ``"Intel(R) Xeon(R) Processor, 2 logical cores"``."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores"
