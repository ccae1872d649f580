"""TensorBoard backend: scalars, evaluation frames, and hparams for the HParams tab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from av_td3.config import TensorboardConfig
from av_td3.rundir import EVENT_FILE_PREFIX, TB_DIR, atomic_write_bytes


def purge_event_files(tb_dir: Path, purge_step: int) -> int:
    """Drop every event at or after ``purge_step`` from the event files in ``tb_dir`` (a resumed run logs those
    steps again), keeping the rest in order; each file is rewritten atomically
    (:func:`av_td3.rundir.atomic_write_bytes`).
    SummaryWriter's own ``purge_step`` only writes a marker that some TensorBoard loaders ignore, which left the
    purged steps there twice. Returns the number of events dropped."""
    dropped = 0
    for path in sorted(tb_dir.glob(EVENT_FILE_PREFIX + "*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if not _at_or_after(r, purge_step)]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        atomic_write_bytes(path, _records_writer(kept))
    return dropped


def _records_writer(records: list[bytes]):  # -> the write callback of atomic_write_bytes
    def write(f) -> None:
        writer = RecordWriter(f)  # TFRecord framing: length, CRCs
        for record in records:
            writer.write(record)
    return write


def _at_or_after(record: bytes, step: int) -> bool:
    event = Event.FromString(record)
    # the file header (file_version) and run info sit at step 0 and stay
    return event.step >= step and not event.HasField("file_version")


class TensorboardBackend:
    def __init__(self, cfg: TensorboardConfig, run_dir: Path, purge_step: int | None) -> None:
        # purge_step: a resumed run drops the points the killed process logged after its last checkpoint.
        if purge_step is not None and (run_dir / TB_DIR).is_dir():
            purge_event_files(run_dir / TB_DIR, purge_step)
        self.writer = SummaryWriter(str(run_dir / TB_DIR), flush_secs=cfg.flush_secs, purge_step=purge_step)
        self.max_images = cfg.eval_images

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        if self.max_images > 0:
            self.writer.add_images(tag, images[: self.max_images, None], step, dataformats="NCHW")

    def log_run_info(self, config: dict, hparams: dict, info: dict[str, str]) -> None:
        self.writer.add_text("run/info", "\n\n".join(f"**{k}**: {v}" for k, v in info.items()), 0)

    def log_final(self, hparams: dict, metrics: dict[str, float]) -> None:
        # Written into this run's own event file (SummaryWriter.add_hparams would open a sub-run).
        exp, ssi, sei = hparams_summary(hparams, {f"hparams/{k}": v for k, v in metrics.items()})
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(f"hparams/{k}", v)

    def close(self) -> None:
        self.writer.close()
