"""TensorBoard backend: scalars, evaluation frames, and hparams for the HParams tab."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from av_td3.config import TensorboardConfig


class TensorboardBackend:
    def __init__(self, cfg: TensorboardConfig, run_dir: Path, purge_step: int | None) -> None:
        # purge_step: a resumed run hides the points the killed process logged after its last checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tb"), flush_secs=cfg.flush_secs, purge_step=purge_step)
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
