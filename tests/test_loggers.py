"""Logging backends: what they log is really in their stores (read back here), they write only inside the run
dir, they never touch the network, and a missing optional package names its pip extra."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from av_td3 import loggers
from av_td3.config import ConfigError, LoggerConfig, MlflowConfig, WandbConfig
from av_td3.loggers.base import Backend

# Nothing here may wait on a network; if something does, fail instead of hanging the suite.
pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"seed": 3, "agent": {"name": "td3", "lr": {"actor": 0.001}}}
HPARAMS = {"seed": 3, "agent.name": "td3", "agent.lr.actor": 0.001}
INFO = {"seed": "3", "git_commit": "0123abc", "versions": "torch=2.3 numpy=1.26"}


def exercise(logger: Backend, steps: range) -> None:
    """What a training run does with its logger (also run in a child process by the offline test)."""
    logger.log_run_info(CONFIG, HPARAMS, INFO)
    for step in steps:
        logger.log_scalars({"train/loss": step / 10}, step)
    logger.log_images("eval/frames", np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8), steps[-1])
    logger.log_final(HPARAMS, {"return": 1.5})
    logger.close()


# ------------------------------------------------------------------------------------------------- read-back helpers
def wandb_records(path: Path) -> list:
    """Parse a .wandb file: a ':W&B' header, then LevelDB-log framed protobuf records (32 KiB blocks,
    7-byte chunk headers: crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(chunks))
            chunks = b""
    return records


def wandb_items(records: list, kind: str) -> list[dict]:
    """The key -> value maps of each history / config / summary record."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
             for i in (r.history.item if kind == "history" else getattr(r, kind).update)}
            for r in records if r.WhichOneof("record_type") == kind]


def wandb_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def loss_steps_wandb(path: Path) -> list[int]:
    return [h["_step"] for h in wandb_items(wandb_records(path), "history") if "train/loss" in h]


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------------------------ wandb
def test_wandb_offline_logs_everything_inside_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from av_td3.loggers.wandb import WandbBackend

    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    exercise(WandbBackend(WandbConfig(), run_dir, None), range(0, 50, 10))

    assert all_files(cwd) == []
    [path] = wandb_run_files(run_dir)
    assert path.stat().st_size > 1000
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == (run_dir / "wandb" / "run_id").read_text() and run.project == "av-td3"
    history = wandb_items(records, "history")
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == \
        [(0, 0.0), (10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]
    assert any(h.get("eval/frames/count") == 2 for h in history)  # nested keys are joined with "/"
    assert len(list(run_dir.glob("wandb/offline-run-*/files/media/images/eval/frames_*.png"))) == 2
    config = {k: v for c in wandb_items(records, "config") for k, v in c.items()}
    assert config["agent"] == CONFIG["agent"] and config["run_info"] == INFO
    assert any(s.get("final/return") == 1.5 for s in wandb_items(records, "summary"))
    # wandb-core's own debug log stays in the run dir too.
    assert list(run_dir.glob("wandb/cache/**/core-debug-*.log"))


def test_wandb_resume_continues_the_same_run(tmp_path: Path) -> None:
    from av_td3.loggers.wandb import WandbBackend

    exercise(WandbBackend(WandbConfig(), tmp_path, None), range(0, 50, 10))
    exercise(WandbBackend(WandbConfig(), tmp_path, purge_step=20), range(20, 70, 10))

    first, resumed = wandb_run_files(tmp_path)
    run_ids = {next(r.run.run_id for r in wandb_records(p) if r.WhichOneof("record_type") == "run")
               for p in (first, resumed)}
    assert run_ids == {(tmp_path / "wandb" / "run_id").read_text()}
    # Nothing is purged: the killed attempt keeps its points, the resumed one logs again from purge_step.
    assert loss_steps_wandb(first) == [0, 10, 20, 30, 40]
    assert loss_steps_wandb(resumed) == [20, 30, 40, 50, 60]


# ----------------------------------------------------------------------------------------------------------- mlflow
def test_mlflow_logs_to_sqlite_store_inside_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from av_td3.loggers.mlflow import MlflowBackend

    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    run_dir.mkdir()
    monkeypatch.chdir(cwd)
    exercise(MlflowBackend(MlflowConfig(), run_dir, None), range(0, 50, 10))

    assert all_files(cwd) == []
    client = mlflow_client(run_dir)
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "av-td3"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == \
        [(0, 0.0), (10, 1.0), (20, 2.0), (30, 3.0), (40, 4.0)]
    assert run.data.metrics["final/return"] == 1.5
    assert run.data.params == {k: str(v) for k, v in HPARAMS.items()}
    assert INFO.items() <= run.data.tags.items()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "images"}
    assert any(p.suffix == ".png" for p in (run_dir / "mlartifacts").rglob("images/eval~frames*"))


def test_mlflow_resume_continues_the_same_run(tmp_path: Path) -> None:
    from av_td3.loggers.mlflow import MlflowBackend

    exercise(MlflowBackend(MlflowConfig(), tmp_path, None), range(0, 50, 10))
    exercise(MlflowBackend(MlflowConfig(), tmp_path, purge_step=20), range(20, 70, 10))

    client = mlflow_client(tmp_path)
    [run] = client.search_runs([client.get_experiment_by_name("av-td3").experiment_id])
    assert run.info.run_id == (tmp_path / "mlflow_run_id").read_text() and run.info.status == "FINISHED"
    # Nothing is purged: steps 20..40 hold the killed attempt's and the resumed attempt's points.
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [0, 10, 20, 20, 30, 30, 40, 40, 50, 60]
    assert run.data.metrics["train/loss"] == 6.0


# -------------------------------------------------------------------------------------------------------- fan-out
def test_missing_package_names_the_pip_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, cfg in (("wandb", LoggerConfig(wandb=WandbConfig())), ("mlflow", LoggerConfig(mlflow=MlflowConfig()))):
        # Also drop cached submodules (mlflow.entities, ...): they would satisfy the import without the package.
        for mod in [m for m in sys.modules if m.split(".")[0] == name or m == f"av_td3.loggers.{name}"]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)  # what `import name` meets when it is not installed
        with pytest.raises(ConfigError, match=rf"logger=\[\.\.\.,{name}\] needs the {name} package; from the "
                                              rf"repository root: \S+ -m pip install -e '\.\[{name}\]'"):
            loggers.make(cfg, tmp_path)


def test_all_four_backends_offline_write_only_inside_run_dir(tmp_path: Path) -> None:
    """All four in a fresh process, as a training run has them: without CI/pytest variables (MLflow would switch
    its telemetry off by itself and hide a missing opt-out), HOME and cwd in empty dirs, and every HTTP(S) proxy
    pointed at a socket that accepts connections but never answers: a client that phones home is counted there."""
    home, cwd, run_dir = tmp_path / "home", tmp_path / "cwd", tmp_path / "run"
    for d in (home, cwd, run_dir):
        d.mkdir()
    ci_markers = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD",
                  "NO_PROXY", "no_proxy", "DO_NOT_TRACK")
    env = {k: v for k, v in os.environ.items()
           if k not in ci_markers and not k.startswith(("WANDB_", "MLFLOW_", "XDG_"))}
    with socket.create_server(("127.0.0.1", 0)) as canary:
        canary.setblocking(False)
        proxy = f"http://127.0.0.1:{canary.getsockname()[1]}"
        env.update(HOME=str(home), PYTHONPATH=str(REPO), **{k: proxy for k in (
            "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")})
        script = ("import sys; from pathlib import Path; from av_td3 import loggers; "
                  "from av_td3.config import CsvConfig, LoggerConfig, MlflowConfig, TensorboardConfig, WandbConfig; "
                  "from tests.test_loggers import exercise; "
                  "exercise(loggers.make(LoggerConfig(TensorboardConfig(), CsvConfig(), WandbConfig(), "
                  "MlflowConfig()), Path(sys.argv[1])), range(0, 50, 10))")
        proc = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=100)
        assert proc.returncode == 0, proc.stderr
        with pytest.raises(BlockingIOError):
            canary.accept()  # no connection was attempted

    assert all_files(cwd) == [] and all_files(home) == []
    assert any(f.startswith("tb/events.out.tfevents") for f in all_files(run_dir))
    assert (run_dir / "scalars.csv").read_text().count("train/loss") == 5
    assert loss_steps_wandb(wandb_run_files(run_dir)[0]) == [0, 10, 20, 30, 40]
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert [m.step for m in mlflow_client(run_dir).get_metric_history(run_id, "train/loss")] == [0, 10, 20, 30, 40]
    # Nothing chatty on the console: at most MLflow's one-off notes on creating its database tables.
    assert "wandb:" not in proc.stdout + proc.stderr


# -------------------------------------------------------------------------------------------------------------- csv
def csv_rows(path: Path) -> list[list[str]]:
    import csv
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    from av_td3.config import CsvConfig
    from av_td3.loggers.csv import CsvBackend

    exercise(CsvBackend(CsvConfig(), tmp_path, None), range(0, 20, 10))
    with open(tmp_path / "scalars.csv", "a") as f:
        f.write("15,train/loss,")  # a process killed mid-write
    exercise(CsvBackend(CsvConfig(), tmp_path, purge_step=20), range(20, 40, 10))
    assert csv_rows(tmp_path / "scalars.csv") == [["step", "tag", "value"]] + [
        [str(s), "train/loss", repr(s / 10)] for s in (0, 10, 20, 30)]


@pytest.mark.parametrize("purge_step", [None, 0])
def test_csv_resume_into_an_empty_file_writes_the_header(tmp_path: Path, purge_step: int | None) -> None:
    from av_td3.config import CsvConfig
    from av_td3.loggers.csv import CsvBackend

    (tmp_path / "scalars.csv").touch()  # a run killed before its first row reached the disk
    exercise(CsvBackend(CsvConfig(), tmp_path, purge_step), range(0, 20, 10))
    assert csv_rows(tmp_path / "scalars.csv") == [["step", "tag", "value"], ["0", "train/loss", "0.0"],
                                                  ["10", "train/loss", "1.0"]]


def test_tensorboard_resume_leaves_each_step_once_in_the_event_files(tmp_path: Path) -> None:
    """A killed run logged steps 0..50 (checkpoint at 20); the resumed one logs 20..70 again: the event files
    then hold each (tag, step) once, read by TensorBoard's own loader, and the resumed values win."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from av_td3.config import TensorboardConfig
    from av_td3.loggers.tensorboard import TensorboardBackend

    first = TensorboardBackend(TensorboardConfig(), tmp_path, purge_step=None)
    for step in range(0, 60, 10):
        first.log_scalars({"train/loss": 1.0}, step)
    first.close()
    second = TensorboardBackend(TensorboardConfig(), tmp_path, purge_step=20)
    for step in range(20, 80, 10):
        second.log_scalars({"train/loss": 2.0}, step)
    second.close()
    points = [(e.step, v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value)
              for f in sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
              for e in EventFileLoader(str(f)).Load() for v in e.summary.value if v.tag == "train/loss"]
    assert sorted(points) == [(0, 1.0), (10, 1.0)] + [(s, 2.0) for s in range(20, 80, 10)]
