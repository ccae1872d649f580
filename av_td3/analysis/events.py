"""Read a run's scalars completely into one long table ``step, tag, value``.

TensorBoard's ``EventAccumulator`` keeps only a reservoir sample (10,000 points per tag by default), which would
hide a violation at step 15,000; reading the records ourselves sees every point. After a resume the trainer
re-logs the steps since the last checkpoint, so a (tag, step) pair can occur twice: the later write wins, since
it belongs to the run as it actually continued.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.util import tensor_util

from av_td3.rundir import EVENT_FILE_PREFIX, TB_DIR

EVENT_GLOB = f"{EVENT_FILE_PREFIX}*"
COLUMNS = ["step", "tag", "value"]


def is_event_file(path: Path) -> bool:
    return path.is_file() and path.name.startswith(EVENT_FILE_PREFIX)


def find_event_files(run_dir: Path) -> list[Path]:
    """All TensorBoard event files of a run (a resumed run adds a file next to the first)."""
    return sorted((run_dir / TB_DIR).rglob(EVENT_GLOB))


def _scalar(value) -> float | None:  # value: a tensorboard Summary.Value proto
    """The float in a summary value, or None for images, histograms and other non-scalar summaries."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":  # torch's SummaryWriter and TF1 writers
        return float(value.simple_value)
    if kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":  # TF2 / tensorboard.summary
        arr = tensor_util.make_ndarray(value.tensor)
        return float(arr) if arr.size == 1 else None
    return None


def _last_per_step(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the last-written value of each (tag, step); ``df`` must be in write order."""
    df = df.drop_duplicates(["tag", "step"], keep="last")
    return df.sort_values(["tag", "step"], kind="stable").reset_index(drop=True)[COLUMNS]


def read_event_files(files: Iterable[Path]) -> pd.DataFrame:
    """Every scalar in ``files`` as a DataFrame ``step, tag, value`` (last value per duplicated step)."""
    wall, steps, tags, values = [], [], [], []
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                x = _scalar(v)
                if x is not None:
                    wall.append(event.wall_time)
                    steps.append(event.step)
                    tags.append(v.tag)
                    values.append(x)
    df = pd.DataFrame({"wall": np.asarray(wall, dtype=float), "step": np.asarray(steps, dtype=np.int64),
                       "tag": pd.Series(tags, dtype=object),  # object even when empty, so .str works
                       "value": np.asarray(values, dtype=float)})
    # Write order across files = wall-clock order (a resumed run's file is written later); the stable sort
    # keeps the in-file order of events with equal timestamps.
    return _last_per_step(df.sort_values("wall", kind="stable"))


def read_scalars_csv(path: Path) -> pd.DataFrame:
    """The trainer's ``scalars.csv`` (same scalars as TensorBoard) as ``step, tag, value``; rows are appended in
    write order, so the last duplicate wins here too."""
    df = pd.read_csv(path, dtype={"step": np.int64, "tag": str, "value": float})
    return _last_per_step(df)


def series(df: pd.DataFrame, tag: str) -> pd.Series:
    """One tag's values indexed by step (empty when the tag was never logged)."""
    sel = df[df["tag"] == tag]
    return pd.Series(sel["value"].to_numpy(), index=sel["step"].to_numpy(), name=tag, dtype=float)
