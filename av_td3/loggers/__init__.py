"""Logging backends selected by ``logger=[...]``, behind one fan-out logger."""

from __future__ import annotations

from pathlib import Path

from av_td3.config import LoggerConfig
from av_td3.loggers.base import Backend, FanOut


def make(cfg: LoggerConfig, run_dir: Path, purge_step: int | None = None) -> FanOut:
    """Build the selected backends. ``purge_step`` (on resume): drop points logged at or after that step."""
    backends: list[Backend] = []
    if cfg.tensorboard is not None:
        from av_td3.loggers.tensorboard import TensorboardBackend
        backends.append(TensorboardBackend(cfg.tensorboard, run_dir, purge_step))
    if cfg.csv is not None:
        from av_td3.loggers.csv import CsvBackend
        backends.append(CsvBackend(cfg.csv, run_dir, purge_step))
    if cfg.wandb is not None:
        from av_td3.loggers.wandb import WandbBackend
        backends.append(WandbBackend(cfg.wandb, run_dir, purge_step))
    if cfg.mlflow is not None:
        from av_td3.loggers.mlflow import MlflowBackend
        backends.append(MlflowBackend(cfg.mlflow, run_dir, purge_step))
    return FanOut(backends)
