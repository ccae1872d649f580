"""The one interface every logging backend implements; the trainer only talks to :class:`FanOut`."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    def log_scalars(self, scalars: dict[str, float], step: int) -> None: ...

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        """``images``: uint8 [N, H, W] grayscale frames."""

    def log_run_info(self, config: dict, hparams: dict[str, float | int | str | bool],
                     info: dict[str, str]) -> None:
        """Once at start: the full config, the flat hyper-parameters to compare runs by, and provenance
        (seed, git commit, package versions)."""

    def log_final(self, hparams: dict[str, float | int | str | bool], metrics: dict[str, float]) -> None:
        """Once at the end: final metrics next to the hyper-parameters (TensorBoard's HParams tab)."""

    def close(self) -> None: ...


class FanOut:
    """Sends every call to each selected backend."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log_scalars(scalars, step)

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        for b in self.backends:
            b.log_images(tag, images, step)

    def log_run_info(self, config: dict, hparams: dict, info: dict[str, str]) -> None:
        for b in self.backends:
            b.log_run_info(config, hparams, info)

    def log_final(self, hparams: dict, metrics: dict[str, float]) -> None:
        for b in self.backends:
            b.log_final(hparams, metrics)

    def close(self) -> None:
        for b in self.backends:
            b.close()
