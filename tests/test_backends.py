"""What each env backend declares about itself (av_td3/envs/backends.py), read without building a simulator, and the
base class deciding termination and truncation from the signals a backend reports."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from av_td3 import bounds, envs
from av_td3.agent.td3 import TD3
from av_td3.config import (RENAMED_KEYS, AgentConfig, CarlaConfig, ConfigError, EnvConfig, MonitorConfig,
                           RewardConfig, renamed_key)
from av_td3.envs import backends, base
from av_td3.envs.base import DrivingEnv, DrivingSignals
from av_td3.rundir import renamed_override, without_other_backends
from av_td3.train import agent_spec
from av_td3.train.build import make_envs


def test_declarations_are_read_without_importing_a_simulator() -> None:
    code = ("import sys; from av_td3.config import EnvConfig; from av_td3.envs import backend; "
            "b = backend(EnvConfig(name='carla')); b.state_dim(EnvConfig()); "
            "assert not {'carla', 'highway_env', 'pygame'} & set(sys.modules), sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("shares", [False, True])
def test_where_evaluation_runs_follows_the_declaration_not_the_name(shares: bool, monkeypatch) -> None:
    """eval_shares_env: the evaluation env is the training env itself (one world per server), and a second
    training env is refused naming env.num_envs; otherwise evaluation gets an env of its own."""
    monkeypatch.setitem(backends.BACKENDS, "highway", dataclasses.replace(backends.HIGHWAY, eval_shares_env=shares))
    cfg = EnvConfig(max_episode_steps=5)
    train_envs, eval_env = make_envs(cfg)
    try:
        assert (eval_env is train_envs.envs[0]) == shares
    finally:
        train_envs.close()
        if not shares:
            eval_env.close()
    if shares:
        with pytest.raises(ConfigError, match=r"env\.num_envs=2 with env=highway"):
            make_envs(EnvConfig(num_envs=2))


def test_carla_refuses_a_second_env_before_contacting_a_server() -> None:
    with pytest.raises(ConfigError, match=r"env\.num_envs=2 with env=carla: one carla server runs one env"):
        make_envs(EnvConfig(name="carla", num_envs=2, carla=CarlaConfig(host="192.0.2.1", timeout_s=0.1)))


def test_the_declared_decision_interval_sets_the_reward_bound() -> None:
    """The bound on |r| (and so the q_divergence alert) grows with the seconds one decision lasts: CARLA's
    fixed tick, highway-env's sim // policy physics steps. Each backend ignores the other's timing keys."""
    def bound(**env) -> float:
        return bounds.max_abs_reward(SimpleNamespace(env=EnvConfig(**env)))

    def carla(dt: float, **env) -> float:
        return bound(name="carla", carla=CarlaConfig(fixed_delta_s=dt), **env)

    assert carla(0.1) > carla(0.05) and carla(0.05) == carla(0.05, policy_frequency=1)
    assert bound(policy_frequency=1) > bound(policy_frequency=5) == bound(carla=CarlaConfig(fixed_delta_s=0.5))


def test_the_state_the_highway_env_returns_is_the_state_the_agent_is_built_for() -> None:
    cfg = EnvConfig(lane_points=3, max_episode_steps=5)
    spec = agent_spec(cfg)
    env = envs.make(cfg, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        assert obs["state"].shape == (spec.state_dim,) == spec.state_scale.shape
        agent = TD3(AgentConfig(batch_size=8, features_dim=16, hidden_dim=32), MonitorConfig(), spec,
                    torch.device("cpu"), q_bound=1e6, seed=0)
        action = agent.act({k: v[None] for k, v in obs.items()})
        assert action.shape == (1, 2) and env.action_space.contains(action[0])
    finally:
        env.close()


@pytest.mark.parametrize("sim, policy, dt", [(15, 5, 0.2), (15, 4, 0.2), (10, 3, 0.3), (5, 5, 0.2)])
def test_the_highway_decision_interval_is_the_one_highway_env_integrates(sim: int, policy: int, dt: float) -> None:
    """One formula for the reward's jerk term, the PID and the Q bound: highway-env runs sim // policy physics
    steps of 1/sim s per action, so 15 and 4 give 0.2 s, not 1/4 s (the two disagreed before)."""
    from av_td3.envs.highway import HighwayDrivingEnv

    cfg = EnvConfig(simulation_frequency=sim, policy_frequency=policy)
    assert backends.HIGHWAY.decision_dt(cfg) == pytest.approx(dt)
    env = HighwayDrivingEnv(cfg, seed=0)
    try:
        assert env.reward_fn.dt == pytest.approx(dt)
        env.reset(seed=0)
        before = env.sim.steps
        env.step(np.zeros(2, dtype=np.float32))
        assert (env.sim.steps - before) / sim == pytest.approx(dt)  # physics steps integrated by this decision
    finally:
        env.close()


def test_every_consumer_of_the_highway_decision_interval_uses_the_one_formula() -> None:
    """At 15 Hz simulation and 4 Hz policy the two formulas the code once had disagree (1/4 = 0.25 s against
    (15 // 4) / 15 = 0.2 s): the PID the trainer builds, the Q bound and the env's reward (jerk) all take 0.2 s."""
    import torch

    from av_td3 import bounds
    from av_td3.config import AgentConfig, Config
    from av_td3.envs.highway import HighwayDrivingEnv
    from av_td3.train.build import make_agent

    cfg = Config(agent=AgentConfig(name="pid"), env=EnvConfig(simulation_frequency=15, policy_frequency=4))
    dt = backends.HIGHWAY.decision_dt(cfg.env)
    assert dt == pytest.approx(0.2)
    pid, _ = make_agent(cfg, None, torch.device("cpu"), q_bound=0.0)  # type: ignore[arg-type]  (pid needs no spec)
    assert pid.dt == dt  # type: ignore[attr-defined]
    assert bounds.max_abs_reward(cfg) == base.max_abs_reward(cfg.env.reward, dt)
    assert bounds.max_abs_reward(cfg) != base.max_abs_reward(cfg.env.reward, 1 / cfg.env.policy_frequency)
    env = HighwayDrivingEnv(cfg.env, seed=0)
    try:
        assert env.reward_fn.dt == dt
    finally:
        env.close()


def test_an_unknown_backend_names_the_choices() -> None:
    cfg = EnvConfig()
    object.__setattr__(cfg, "name", "gta")  # past the schema's own check
    with pytest.raises(ConfigError, match="env.name='gta' is not valid: choose one of highway, carla"):
        envs.backend(cfg)


def test_another_backends_changed_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert backends.warn_ignored(EnvConfig()) == []
        assert backends.warn_ignored(EnvConfig(carla=CarlaConfig(port=2004))) == ["env.carla.port"]
        assert backends.warn_ignored(EnvConfig(name="carla", policy_frequency=10, view="world")) == [
            "env.view", "env.policy_frequency"]
    assert "env.carla.port: settings of another backend, ignored by env.name=highway" in caplog.text
    cfg = EnvConfig()
    cfg.carla.camera.x = 2.0  # a nested key of the section
    assert backends.warn_ignored(cfg) == ["env.carla.camera.x"]


def test_a_backends_section_is_named_as_the_backend() -> None:
    """rundir.without_other_backends reads env.<name>.* as backend <name>'s own keys without importing the
    backends; this holds it to their declarations."""
    assert backends.CARLA.section == "carla"
    for declared in backends.BACKENDS.values():
        assert declared.section in (None, declared.name)
    assert without_other_backends({"env.name": "highway", "env.carla.port": 2000, "env.npcs": 5}) == {
        "env.name": "highway", "env.npcs": 5}
    assert "env.carla.port" in without_other_backends({"env.name": "carla", "env.carla.port": 2000})


def test_max_abs_reward_counts_the_largest_rule_penalty_of_the_backend() -> None:
    reward = RewardConfig(red_light_penalty=30.0)
    plain = base.max_abs_reward(reward, 0.2)
    assert base.max_abs_reward(reward, 0.2, backends.CARLA.rules) == pytest.approx(plain + 30.0)
    assert base.max_abs_reward(reward, 0.2, backends.HIGHWAY.rules) == plain  # the highway bound is unchanged


def test_moved_keys_have_their_new_names() -> None:
    assert RENAMED_KEYS["env.host"] == "env.carla.host" and "env.traffic_light" not in RENAMED_KEYS
    assert renamed_key("env.route.start_index") == "env.carla.route.start_index"
    assert renamed_key("env.lead_vehicle") is None and renamed_key("env.hostname") is None
    assert renamed_override("env.port=2004") == "env.carla.port=2004"
    assert renamed_override("+env.camera.x=1") == "+env.carla.camera.x=1"
    assert renamed_override("agent=ddpg") == "agent=ddpg"


class Scripted(DrivingEnv):
    """A backend that reports the signals a test hands it, one per step."""

    def __init__(self, signals: list[DrivingSignals], **kwargs) -> None:
        super().__init__(8, 8, 2, 1, max_episode_steps=10, reward=RewardConfig(), dt=0.1, **kwargs)
        self.signals = signals

    def _sim_reset(self, seed):
        return np.zeros((8, 8), np.uint8), np.zeros(base.state_dim(1), np.float32), _signals()

    def _sim_step(self, action):
        return np.full((8, 8), len(self.signals), np.uint8), np.ones(base.state_dim(1), np.float32), \
            self.signals.pop(0)


def _signals(**kw) -> DrivingSignals:
    return DrivingSignals(**{"speed": 5.0, "speed_along_lane": 5.0, "lateral_offset": 0.0, "lane_half_width": 1.75,
                             "heading_error": 0.0, "collision": False, "off_road": False, "lane_invasion": False,
                             "progress": 0.5, **kw})


@pytest.mark.parametrize("kw, terminated, truncated, why", [
    ({}, False, False, ""),
    ({"rule": "blocked"}, True, False, "blocked"),
    ({"rule": "blocked", "collision": True}, True, False, "collision"),
    ({"off_road": True, "rule": "wrong_way"}, True, False, "off_road"),
    ({"route_done": True}, False, True, ""),
    ({"route_done": True, "rule": "red_light"}, True, False, "red_light"),  # a terminal state beats the good end
])
def test_the_base_class_decides_termination_and_truncation_from_the_signals(kw, terminated, truncated, why) -> None:
    env = Scripted([_signals(**kw)], rules=backends.CARLA.rules)
    env.reset(seed=0)
    _, _, term, trunc, info = env.step(np.zeros(2))
    assert (term, trunc, info["termination"]) == (terminated, truncated, why)


def test_an_interrupted_step_is_truncated_on_the_last_observation_with_nothing_earned() -> None:
    env = Scripted([_signals(), _signals(interrupted=True, rule="blocked")], rules=backends.CARLA.rules)
    env.reset(seed=0)
    before, *_ = env.step(np.zeros(2))
    after, reward, term, trunc, info = env.step(np.zeros(2))
    assert (reward, term, trunc, info["termination"]) == (0.0, False, True, "")
    np.testing.assert_array_equal(after["image"], before["image"])  # the frame stack is left as it was
    assert tuple(info["reward_components"]) == backends.CARLA.reward_components
    assert set(info["reward_components"].values()) == {0.0}
