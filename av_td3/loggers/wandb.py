"""Weights & Biases backend: offline by default (no network needed), everything under ``<run_dir>/wandb``.

An offline run is uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, cast

import numpy as np

from av_td3 import commands
from av_td3.config import ConfigError, WandbConfig

try:
    import wandb
except ImportError as e:
    raise ConfigError("logger=[...,wandb] needs the wandb package; from the repository root: "
                      f"{commands.pip_install('-e', '.[wandb]')}") from e


@contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the variables the user has not set, only for the block (the next run in this process has its own)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            del os.environ[k]


class WandbBackend:
    def __init__(self, cfg: WandbConfig, run_dir: Path, purge_step: int | None) -> None:
        root = run_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        # Resume continues the same run id. wandb cannot delete logged history: the points the killed process
        # logged at or after purge_step stay, and the resumed process logs from purge_step again. Offline, each
        # attempt writes its own .wandb file (`wandb sync` sends both to the one run); online, W&B ignores steps
        # below the run's last step, so that range keeps the killed process's points.
        if purge_step is not None and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        offline = cfg.mode != "online"
        # the schema allows only these (one_of); wandb's signature spells them as a Literal
        mode = cast(Literal["offline", "online", "disabled"], cfg.mode)
        # wandb-core is started by the first init and reads these once: its debug log goes to the cache dir
        # (default ~/.cache/wandb), and without the second it may send crash reports.
        with _env_defaults({"WANDB_CACHE_DIR": str(root / "cache"), "WANDB_ERROR_REPORTING": "false"}):
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=mode, dir=str(run_dir), id=run_id,
                resume="allow",
                settings=wandb.Settings(
                    # No banner and no stdout capture: the trainer owns the terminal.
                    silent=True, console="off",
                    # Offline there is nowhere to send system metrics or host metadata, and collecting them
                    # probes cloud metadata endpoints that wait on a network which is not there.
                    x_disable_stats=offline, x_disable_meta=offline, x_disable_machine_info=offline,
                ),
            )

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        self.run.log({tag: [wandb.Image(frame) for frame in images]}, step=step)

    def log_run_info(self, config: dict, hparams: dict, info: dict[str, str]) -> None:
        # The nested config already holds every hyper-parameter (W&B compares runs by its dotted keys).
        # allow_val_change: a resumed online run gets its earlier config back from the server.
        self.run.config.update({**config, "run_info": info}, allow_val_change=True)

    def log_final(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        self.run.finish()
        # Stop wandb-core now: the next run in this process (a sequential sweep) starts one with its own cache dir.
        wandb.teardown()
