"""The trainer on env=carla, against the CARLA test double: one connection for training and evaluation, and a
simulator that restarts or goes away mid-run (the worker is run in this process, see carla_double.InlineWorker)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from av_td3.analysis.events import read_scalars_csv
from av_td3.config import ConfigError
from av_td3.envs.base import SimulatorLostError
from av_td3.envs.carla import worker as carla_worker
from av_td3.train import Trainer
from tests import carla_double
from tests.carla_double import FakeCarlaModule
from tests.test_config import load

ARGS = ("env=carla", "debug=smoke", "trainer.total_steps=80", "trainer.learning_starts=40", "trainer.eval_every=40",
        "trainer.log_every=20", "env.max_episode_steps=30", "env.npcs=3", "trainer.resume=none",
        "env.carla.event_wait_s=0.0")


@pytest.fixture
def fake_carla(monkeypatch, tmp_path) -> FakeCarlaModule:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # port-claim files

    class MarkedImage(carla_double.Image):
        """The double's uniform image plus a dark lane marking, so the trainer's camera self-check passes."""

        def __init__(self, frame: int, width: int, height: int) -> None:
            super().__init__(frame, width, height)
            self.raw_data = bytes(4 * width) + self.raw_data[4 * width:]

    monkeypatch.setattr(carla_double, "Image", MarkedImage)
    fake = FakeCarlaModule()
    monkeypatch.setitem(sys.modules, "carla", fake)
    monkeypatch.setattr(carla_worker, "start_worker", carla_double.inline_workers(fake.server))
    return fake


def on_tick_number(fake: FakeCarlaModule, n: int, action) -> None:
    """Run ``action`` right after the server's ``n``-th tick from now."""
    tick, count = fake.server.tick, [0]

    def counted(dt: float) -> None:
        tick(dt)
        count[0] += 1
        if count[0] == n:
            action()

    fake.server.tick = counted


def test_training_on_carla_evaluates_on_the_same_connection(fake_carla, tmp_path: Path) -> None:
    trainer = Trainer(load(*ARGS), tmp_path / "run")
    assert trainer.eval_env is trainer.envs.envs[0]
    summary = trainer.train()
    assert summary.status == "completed" and summary.steps == 80
    df = read_scalars_csv(tmp_path / "run" / "scalars.csv")
    assert list(df[df.tag == "eval/return"]["step"]) == [40, 80]
    assert (df[df.tag == "env/reconnects"]["value"] == 0).all()
    assert trainer.agent.critic_updates == 40


def test_a_server_restart_mid_training_restarts_the_worker_and_training_goes_on(fake_carla, tmp_path: Path) -> None:
    trainer = Trainer(load(*ARGS), tmp_path / "run")
    on_tick_number(fake_carla, 40, fake_carla.server.restart)  # during the first training episode
    summary = trainer.train()
    assert summary.status == "completed" and summary.steps == 80
    # one transition per env step, none twice, less the step the server was lost in (#35: it never happened)
    assert len(trainer.buffer) == 79
    df = read_scalars_csv(tmp_path / "run" / "scalars.csv")
    assert df[df.tag == "env/reconnects"]["value"].iloc[-1] == 1
    assert list(df[df.tag == "eval/return"]["step"]) == [40, 80]
    assert trainer.envs.envs[0].restarts == 1


def test_a_server_that_never_comes_back_checkpoints_and_stops(fake_carla, tmp_path: Path) -> None:
    trainer = Trainer(load(*ARGS, "env.carla.server_lost_minutes=0"), tmp_path / "run")
    on_tick_number(fake_carla, 40, lambda: setattr(fake_carla.server, "down", True))
    with pytest.raises(SimulatorLostError, match="no CARLA server at localhost:2000 for 0 minute"):
        trainer.train()
    assert trainer.summary.status == "stopped" and "simulator lost" in trainer.summary.reason
    assert list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_a_lost_server_exits_non_zero_with_how_to_resume(fake_carla, tmp_path: Path, caplog) -> None:
    from hydra import compose, initialize_config_dir

    from av_td3.app import EXIT_FAILED, run_job
    from tests.test_config import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*ARGS, "env.carla.server_lost_minutes=0"])
    on_tick_number(fake_carla, 40, lambda: setattr(fake_carla.server, "down", True))
    objective, code = run_job(cfg, tmp_path / "run", resume_command="python launch.py env=carla")
    assert code == EXIT_FAILED != 0
    assert "no CARLA server at localhost:2000 for 0 minute(s)" in caplog.text and "rerun" in caplog.text
    assert list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_carla_refuses_several_envs_on_one_server(fake_carla, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env.num_envs=2 with env=carla"):
        Trainer(load(*ARGS, "env.num_envs=2"), tmp_path / "run")


def test_an_unusable_server_mid_run_checkpoints_and_stops_naming_the_fix(fake_carla, tmp_path: Path, caplog) -> None:
    """#35: an error retrying cannot fix (here the Traffic Manager's port, taken while the worker restarted) is no
    bare crash: the run checkpoints, records why, and exits 2 with the key to change."""
    from hydra import compose, initialize_config_dir

    from av_td3.app import EXIT_CONFIG, run_job
    from tests.test_config import CONF

    def restart_with_the_port_taken() -> None:
        fake_carla.server.restart()
        fake_carla.server.host_ports_in_use = {8000}

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(ARGS))
    on_tick_number(fake_carla, 40, restart_with_the_port_taken)
    _, code = run_job(cfg, tmp_path / "run", resume_command="python launch.py env=carla")
    assert code == EXIT_CONFIG
    assert "simulator unusable" in caplog.text and "env.carla.tm_port" in caplog.text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["reason"].startswith("simulator unusable")
    assert list((tmp_path / "run" / "checkpoints").glob("*.pt"))


class SteadyPolicy:
    """Always the same action: the evaluation's outcome depends on the episode seed alone."""

    def for_evaluation(self) -> SteadyPolicy:
        return self

    def act(self, obs: dict, noise: float = 0.0) -> np.ndarray:
        return np.array([[0.05, 0.6]], dtype=np.float32)

    def check_action(self, action: np.ndarray, step: int) -> np.ndarray:
        return action


class NoImages:
    def log_images(self, tag: str, images: np.ndarray, step: int) -> None:
        pass


def evaluate_on_the_double(outage_after_ticks: int | None) -> tuple[dict, int]:
    """The evaluation's metrics over 3 episodes of 15 steps, and the worker restarts it took."""
    from av_td3.envs.carla import CarlaDrivingEnv
    from av_td3.train.evaluation import evaluate
    from tests.test_env_carla import carla_cfg

    fake = FakeCarlaModule()
    env = CarlaDrivingEnv(carla_cfg(max_episode_steps=15), 0, start=carla_double.inline_workers(fake.server),
                          sleep=lambda s: None)
    if outage_after_ticks is not None:
        on_tick_number(fake, outage_after_ticks, fake.server.restart)
    metrics = evaluate(env, SteadyPolicy(), 3, 10_000, 0, NoImages())
    env.close()
    return metrics, env.restarts


def test_an_outage_during_evaluation_leaves_the_evaluation_metrics_unchanged(monkeypatch, tmp_path: Path) -> None:
    """#35: the second episode is cut by a server restart (each episode: 10 settling ticks, 15 steps). It is run
    again from its seed on the fresh worker, so the metrics are those of an evaluation without the outage; before,
    its partial return counted, as a success."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # port-claim files
    clean, restarts = evaluate_on_the_double(None)
    assert restarts == 0
    cut, restarts = evaluate_on_the_double(25 + 10 + 5)  # 5 steps into the second episode
    assert restarts == 1
    assert cut == clean


def test_a_stop_signal_while_the_server_is_lost_stops_at_once_as_that_signal(fake_carla, tmp_path: Path) -> None:
    """#35: SIGTERM arrives (the handler records it) and the server is lost in the same step: the run stops as
    interrupted by SIGTERM, checkpointed, without restarting workers for env.carla.server_lost_minutes."""
    import signal as signals

    from av_td3.train import Interrupted

    trainer = Trainer(load(*ARGS, "env.carla.server_lost_minutes=0.05", "env.carla.max_reconnects=0"),
                      tmp_path / "run")

    def term_and_lose_the_server() -> None:
        trainer.signals.received = signals.SIGTERM
        fake_carla.server.down = True

    on_tick_number(fake_carla, 40, term_and_lose_the_server)
    with pytest.raises(Interrupted, match="SIGTERM"):
        trainer.train()
    assert trainer.summary.status == "stopped" and trainer.summary.reason == "interrupted by SIGTERM"
    # The worker's own reconnect loop saw the pending stop: no reconnect, no worker restarted
    assert trainer.envs.envs[0].restarts == 0 and list((tmp_path / "run" / "checkpoints").glob("*.pt"))
