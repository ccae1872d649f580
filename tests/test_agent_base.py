"""The agent protocol (av_td3/agent/base.py): both agents implement all of it, and the trainer's view of an
agent's measurements (flush, health) holds before and after updates."""

from __future__ import annotations

import inspect

import numpy as np

from av_td3.agent.base import Agent, Flush, Health
from av_td3.agent.pid import PIDAgent
from av_td3.config import PidConfig
from tests.test_td3 import make_agent, make_batch

MEMBERS = [name for name in dir(Agent) if not name.startswith("_")] + list(Agent.__annotations__)


def test_td3_and_pid_implement_every_member_of_the_protocol() -> None:
    for agent in (make_agent(), PIDAgent(PidConfig(), lane_points=3, dt=0.2, num_envs=2)):
        missing = [m for m in MEMBERS if not hasattr(agent, m)]
        assert not missing, f"{type(agent).__name__} lacks {missing}"
        for name in MEMBERS:
            if inspect.isfunction(getattr(Agent, name, None)):
                want = list(inspect.signature(getattr(Agent, name)).parameters)[1:]
                assert list(inspect.signature(getattr(agent, name)).parameters) == want, name


def test_td3_flushes_nothing_before_its_first_update_and_its_monitor_after() -> None:
    agent = make_agent()
    assert agent.learning and agent.flush(0) == Flush({}) and agent.health() == Health()
    agent.update(make_batch(0), step=1)
    flushed = agent.flush(1)
    assert "train/critic_loss" in flushed.scalars and "guard/skipped_updates" in flushed.scalars
    assert agent.health() == Health(dict(agent.monitor.alert_counts), agent.monitor.skipped_updates)


def test_pid_learns_nothing_and_measures_nothing() -> None:
    pid = PIDAgent(PidConfig(), lane_points=3, dt=0.2, num_envs=1)
    assert not pid.learning and pid.flush(5) == Flush({}) and pid.health() == Health()
    assert isinstance(pid.for_evaluation(), PIDAgent)
    action = pid.check_action(pid.act({"state": np.zeros((1, 11), np.float32)}), step=0)
    assert action.shape == (1, 2)
