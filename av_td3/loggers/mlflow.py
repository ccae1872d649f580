"""MLflow backend: by default a SQLite tracking store ``<run_dir>/mlflow.db`` with artifacts in
``<run_dir>/mlartifacts`` (MLflow 3 refuses the plain file store); or the user's ``tracking_uri``.

Browse it with ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from av_td3 import commands
from av_td3.config import ConfigError, MlflowConfig

# MLflow 3 sends usage telemetry and writes an installation id to ~/.config/mlflow when first imported; a training
# run must not phone home nor write outside its run dir. So this is set before the import; a user's value wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
try:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
except ImportError as e:
    raise ConfigError("logger=[...,mlflow] needs the mlflow package; from the repository root: "
                      f"{commands.pip_install('-e', '.[mlflow]')}") from e


class MlflowBackend:
    def __init__(self, cfg: MlflowConfig, run_dir: Path, purge_step: int | None) -> None:
        run_dir = run_dir.resolve()
        # A client bound to this store, not mlflow.set_tracking_uri: no process-wide state to leak into the next run.
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # The default store keeps its artifacts next to it (MLflow's default root is ./mlruns in the cwd);
            # a user's store keeps its own artifact root.
            artifacts = (run_dir / "mlartifacts").as_uri() if cfg.tracking_uri is None else None
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
        id_file = run_dir / "mlflow_run_id"
        if purge_step is not None and id_file.exists():
            # Resume continues the same run. MLflow cannot delete metric points: those the killed process logged
            # at or after purge_step stay, and the resumed process logs from purge_step again, so those steps
            # hold two values in the metric history (the latest value shown is the resumed run's).
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id).info.run_id
            id_file.write_text(self.run_id)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        # The frames side by side as one image per step: the UI's step slider then shows one evaluation at a time.
        self.client.log_image(self.run_id, np.concatenate(list(images), axis=1), key=tag, step=step)

    def log_run_info(self, config: dict, hparams: dict, info: dict[str, str]) -> None:
        # Params are immutable in MLflow: a resumed run keeps the values its first attempt recorded
        # (the resumed attempt's full config replaces config.yaml).
        recorded = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in hparams.items() if k not in recorded]
        self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in info.items()])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_final(self, hparams: dict, metrics: dict[str, float]) -> None:
        # The hparams are already the run's params (log_run_info).
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", float(v), now, 0)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
