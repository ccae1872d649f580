"""CSV backend: one long-format file ``step,tag,value``, append-only and easy to read with pandas."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from av_td3.config import CsvConfig
from av_td3.rundir import atomic_write_bytes


HEADER = ["step", "tag", "value"]


def _complete(row: list[str]) -> bool:
    """Whether a row is a whole ``step,tag,value`` line (a process killed mid-write can leave a torn last line)."""
    if len(row) != 3:
        return False
    try:
        int(row[0]), float(row[2])
    except ValueError:
        return False
    return True


class CsvBackend:
    def __init__(self, cfg: CsvConfig, run_dir: Path, purge_step: int | None) -> None:
        self.path = run_dir / cfg.filename
        if purge_step is not None and self.path.exists():
            self._purge(purge_step)
        # An empty file (a run killed before its first row was flushed) gets its header like a new one.
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(HEADER)

    def _purge(self, purge_step: int) -> None:
        """Drop rows logged at or after ``purge_step`` (by a process killed after its last checkpoint)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [HEADER] + [r for r in rows[1:] if _complete(r) and int(r[0]) < purge_step]
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        # Renamed over the CSV: a crash leaves the old CSV or the purged one (a resume purges it again).
        atomic_write_bytes(self.path, lambda f: f.write(text.getvalue().encode()), durable=False)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._writer.writerows((step, tag, repr(float(v)) if math.isfinite(v) else str(float(v)))
                               for tag, v in scalars.items())
        self._file.flush()

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        pass  # a CSV holds numbers only

    def log_run_info(self, config: dict, hparams: dict, info: dict[str, str]) -> None:
        pass  # the config is already in .hydra/config.yaml next to the CSV

    def log_final(self, hparams: dict, metrics: dict[str, float]) -> None:
        pass  # final metrics are in summary.json

    def close(self) -> None:
        self._file.close()
