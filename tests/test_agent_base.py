"""The agent protocol (av_td3/agent/base.py): both agents implement all of it, and the trainer's view of an
agent's measurements (flush, health) holds before and after updates."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from av_td3.agent.base import Agent, Flush, Health
from av_td3.agent.pid import PIDAgent
from av_td3.agent.td3 import TD3
from av_td3.config import AgentConfig, MonitorConfig, PidConfig
from av_td3.replay import Batch
from tests.test_td3 import SPEC, make_agent, make_batch

MEMBERS = [name for name in dir(Agent) if not name.startswith("_")] + list(Agent.__annotations__)


def test_td3_and_pid_implement_every_member_of_the_protocol() -> None:
    for agent in (make_agent(), PIDAgent(PidConfig(), lane_points=3, dt=0.2, num_envs=2)):
        missing = [m for m in MEMBERS if not hasattr(agent, m)]
        assert not missing, f"{type(agent).__name__} lacks {missing}"
        for name in MEMBERS:
            if inspect.isfunction(getattr(Agent, name, None)):
                want = list(inspect.signature(getattr(Agent, name)).parameters)[1:]
                assert list(inspect.signature(getattr(agent, name)).parameters) == want, name


def test_td3_flushes_nothing_before_its_first_update_and_its_measurements_after() -> None:
    agent = make_agent()
    assert agent.learning and agent.flush(0) == Flush({}) and agent.health() == Health()
    agent.update(make_batch(0), step=1)
    flushed = agent.flush(1)
    assert "train/critic_loss" in flushed.scalars and "guard/skipped_updates" in flushed.scalars
    assert agent.health() == Health(), "a finite update under the default bound is no health event"


def nan_rewards(seed: int) -> Batch:
    batch = make_batch(seed)
    return batch._replace(reward=torch.full_like(batch.reward, float("nan")))


def test_health_counts_the_updates_the_nan_guard_skipped_and_a_resumed_agent_goes_on_counting() -> None:
    agent = make_agent(**{"monitor.nan_policy": "skip"})
    agent.update(make_batch(0), step=1)
    agent.update(nan_rewards(1), step=2)  # its critic step is skipped; the delayed actor step is finite
    assert agent.health() == Health({}, skipped_updates=1)
    agent.update(nan_rewards(2), step=3)
    assert agent.health().skipped_updates == 2
    resumed = make_agent(**{"monitor.nan_policy": "skip"})
    resumed.load_state_dict(agent.state_dict())
    assert resumed.health() == Health({}, skipped_updates=2), "health is checkpointed with the agent"
    resumed.update(nan_rewards(3), step=4)
    assert resumed.health().skipped_updates == 3


def test_health_counts_each_flush_an_alert_fired_in() -> None:
    """q_divergence fires when |Q| exceeds the agent's bound: with a bound of 1e-9 on every flush that follows an
    update, never on one with no update since the last, and never under the default bound."""
    cfg = AgentConfig(batch_size=8, features_dim=16, hidden_dim=32, augment="none")
    agent = TD3(cfg, MonitorConfig(), SPEC, torch.device("cpu"), q_bound=1e-9, seed=0)
    agent.update(make_batch(0), step=1)
    assert "critic/q_divergence" in agent.flush(1).fired
    agent.update(make_batch(1), step=2)
    agent.flush(2)
    assert agent.flush(3).fired == [], "no update since the last flush: nothing to fire on"
    health = agent.health()
    assert health.alerts["critic/q_divergence"] == 2 and health.skipped_updates == 0
    resumed = TD3(cfg, MonitorConfig(), SPEC, torch.device("cpu"), q_bound=1e-9, seed=0)
    resumed.load_state_dict(agent.state_dict())
    assert resumed.health() == health


def test_pid_learns_nothing_and_measures_nothing() -> None:
    pid = PIDAgent(PidConfig(), lane_points=3, dt=0.2, num_envs=1)
    assert not pid.learning and pid.flush(5) == Flush({}) and pid.health() == Health()
    assert isinstance(pid.for_evaluation(), PIDAgent)
    action = pid.check_action(pid.act({"state": np.zeros((1, 11), np.float32)}), step=0)
    assert action.shape == (1, 2)
