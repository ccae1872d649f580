"""The trainer on env=carla, against the CARLA test double: one connection for training and evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from av_td3.analysis.events import read_scalars_csv
from av_td3.config import ConfigError
from av_td3.train import Trainer
from tests import carla_double
from tests.carla_double import FakeCarlaModule
from tests.test_config import load

ARGS = ("env=carla", "debug=smoke", "trainer.total_steps=80", "trainer.learning_starts=40", "trainer.eval_every=40",
        "trainer.log_every=20", "env.max_episode_steps=30", "env.npcs=3", "trainer.resume=none", "env.event_wait_s=0.0")


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
    return fake


def test_training_on_carla_evaluates_on_the_same_connection(fake_carla, tmp_path: Path) -> None:
    trainer = Trainer(load(*ARGS), tmp_path / "run")
    assert trainer.eval_env is trainer.envs.envs[0]
    summary = trainer.train()
    assert summary.status == "completed" and summary.steps == 80
    df = read_scalars_csv(tmp_path / "run" / "scalars.csv")
    assert list(df[df.tag == "eval/return"]["step"]) == [40, 80]
    assert (df[df.tag == "env/reconnects"]["value"] == 0).all()
    assert trainer.agent.critic_updates == 40


def test_carla_refuses_several_envs_on_one_server(fake_carla, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env.num_envs=2 with env=carla"):
        Trainer(load(*ARGS, "env.num_envs=2"), tmp_path / "run")
