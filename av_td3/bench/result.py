"""What a bench run produces: rows of repeated measurements, skipped rows with the reason, ratios and the
performance issue's targets they are held to. ``bench.json`` is :meth:`BenchResult.to_dict`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

SB3_MISSING = ("stable-baselines3 is not installed, so the SB3 rows are skipped: install the benchmark extra "
               "with `pip install '.[bench]'`")

# Targets of the performance issue (benchmarks on a 2-core CPU at batch 64, 84x84x4, not timed tests).
TARGETS = {
    "separate_vs_sb3": (">=", 1.15),
    "shared_vs_sb3": (">=", 1.6),
    "monitor_overhead_pct": ("<=", 3.0),
    "replay_vs_reference": ("<=", 1.1),
    "env_steps_per_s": (">=", 100.0),
    "env_bev_steps_per_s": (">=", 100.0),
    # the performance issue's targets at the default configuration (2-core CPU)
    "default_update_matmul_fraction": (">=", 0.7),
    "default_monitor_overhead_pct": ("<=", 3.0),
    "default_e2e_steps_per_s": (">=", 20.0),
    "default_e2e_vs_sb3": (">=", 2.5),
    # a shared machine (issue 37): torch's default threads next to two busy processes, against one thread
    "busy_default_vs_threads1": (">=", 0.9),
}


def threads_label(threads: int) -> str:
    """How a row names its ``trainer.torch_threads``: ``threads1``, ..., ``threads_default`` for 0 (torch's)."""
    return f"threads{threads if threads > 0 else '_default'}"


# The regression section's rows: regression/<code>_<threads>, <code> = TODAY (this checkout) or a commit's short hash
REGRESSION_PREFIX = "regression/"
TODAY = "today"


def regression_row(code: str, threads: int) -> str:
    """The row of ``code`` (:data:`TODAY` or a short commit hash) run with ``trainer.torch_threads=threads``
    (0: torch's default)."""
    return f"{REGRESSION_PREFIX}{code}_{threads_label(threads)}"


# The busy section's rows: busy/threads1 and busy/threads_default
BUSY_PREFIX = "busy/"


def busy_row(threads: int) -> str:
    """The busy section's row of ``trainer.torch_threads=threads`` (0: torch's default)."""
    return f"{BUSY_PREFIX}{threads_label(threads)}"


class RowSkipped(Exception):
    """Raised by a row's builder when the row cannot run here; the message says why (it lands in ``skipped``)."""


@dataclass
class Row:
    """One measured quantity, ``values`` one per repetition."""
    name: str
    unit: str
    values: list[float]
    note: str = ""
    cpu_values: list[float] | None = None  # update rows: updates per second of this process's CPU time
    flop_per_update: float | None = None   # update rows: FLOP counted over one critic+actor cycle, per update
    matmul_fraction: float | None = None   # update rows: (updates/s x FLOP/update) / matmul FLOP/s, paired by rep

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": float(min(self.values)),
                "max": float(max(self.values)), "reps": len(self.values), "values": list(map(float, self.values)),
                "note": self.note, "cpu_values": self.cpu_values,
                "cpu_median": None if self.cpu_values is None else float(statistics.median(self.cpu_values)),
                "flop_per_update": self.flop_per_update, "matmul_fraction": self.matmul_fraction}


@dataclass
class BenchResult:
    """Everything one run measured; ``machine`` and ``config`` say where and how."""
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # row name -> why
    ratios: dict[str, float] = field(default_factory=dict)
    # e2e/default's training steps: {"steps", "ms_per_step", "phases": {name: {"ms_per_step", "share"}},
    # "not_per_step_s": {name: seconds}}; see av_td3.bench.e2e.phase_breakdown
    breakdown: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "config": self.config, "rows": [r.to_dict() for r in self.rows],
                "ratios": self.ratios, "targets": targets(self.ratios), "skipped": self.skipped,
                "breakdown": self.breakdown}


def pair_ratios(a: list[float], b: list[float]) -> list[float]:
    """a_i / b_i per repetition: each repetition ran both back to back, under the same load."""
    return [x / y for x, y in zip(a, b)]


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a_i / b_i (:func:`pair_ratios`)."""
    return float(statistics.median(pair_ratios(a, b)))


def targets(ratios: dict[str, float]) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` with its measured value and whether it is met (None: not measured)."""
    out = []
    for key, (op, bound) in TARGETS.items():
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"name": key, "value": value, "target": f"{op} {bound:g}", "met": met})
    return out
