"""The PID + pure-pursuit baseline, DDPG as a configuration of the TD3 update, and a reward that can't be gamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from av_td3.agent.pid import PIDAgent
from av_td3.agent.td3 import TD3
from av_td3.config import PidConfig
from av_td3.envs import make
from av_td3.envs.base import lane_point_slice, state_dim
from tests.test_config import load
from tests.test_td3 import SPEC, make_batch, params

ROOT = Path(__file__).resolve().parent.parent
K = 5


def state_with(speed: float, points: list[tuple[float, float]]) -> np.ndarray:
    s = np.zeros((1, state_dim(K)), np.float32)
    s[0, 0] = speed
    s[0, lane_point_slice(K)] = np.asarray(points, np.float32).reshape(-1)
    return s


def test_pid_steers_toward_the_lane_and_holds_the_target_speed() -> None:
    pid = PIDAgent(PidConfig(target_speed=5.0), lane_points=K, dt=0.2, num_envs=1)
    straight = [(4.0 * i, 0.0) for i in range(1, K + 1)]
    left = [(4.0 * i, 0.5 * i) for i in range(1, K + 1)]
    right = [(4.0 * i, -0.5 * i) for i in range(1, K + 1)]
    steer = lambda pts, v=5.0: pid.act({"state": state_with(v, pts)})[0]  # noqa: E731
    assert steer(straight)[0] == pytest.approx(0.0, abs=1e-6)
    assert steer(left)[0] > 0.05 and steer(right)[0] < -0.05
    pid.reset(np.array([0]))
    assert steer(straight, v=0.0)[1] > 0.5, "too slow: throttle"
    pid.reset(np.array([0]))
    assert steer(straight, v=15.0)[1] < -0.5, "too fast: brake"


def test_pid_drives_the_racetrack_without_crashing() -> None:
    cfg = load("env.npcs=0", "env.image.height=32", "env.image.width=32", "env.max_episode_steps=200").env
    env = make(cfg)
    pid = PIDAgent(load("agent=pid").agent.pid, cfg.lane_points, 1 / cfg.policy_frequency, num_envs=1)
    obs, _ = env.reset(seed=3)
    total, done = 0.0, False
    while not done:
        obs, r, term, trunc, _ = env.step(pid.act({"state": obs["state"][None]})[0])
        total += r
        done = term or trunc
    env.close()
    assert trunc and not term, "the controller keeps the car on the road for the whole episode"
    assert total > 0


def test_ddpg_is_a_configuration_single_critic_no_delay_no_smoothing() -> None:
    cfg = load("agent=ddpg", "agent.features_dim=16", "agent.hidden_dim=32")
    assert cfg.agent.num_critics == 1 and cfg.agent.policy_noise == 0.0 and cfg.agent.policy_freq == 1
    agent = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
    assert len(agent.critic.heads) == 1
    for i in range(3):
        actor = params(agent.actor)
        agent.update(make_batch(i), step=i)
        assert not all(torch.equal(a, b) for a, b in zip(actor, params(agent.actor))), "actor updates every step"
    # no smoothing: the same batch from the same state gives the same critic update regardless of the noise stream
    a1 = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
    a2 = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
    a2._noise_gen.manual_seed(12345)
    a1.update(make_batch(9), step=1)
    a2.update(make_batch(9), step=1)
    assert all(torch.equal(x, y) for x, y in zip(params(a1.critic), params(a2.critic)))


def test_pid_run_folder_is_read_by_compare(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "pid"
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "agent=pid", "debug=smoke",
                           "trainer.total_steps=100", "trainer.eval_every=100", f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_eval"]["return"] != 0
    from av_td3.cli import main as cli
    assert cli(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "agent=pid" in table and "1 (1 completed" in table


# ------------------------------------------------------------------------------------------------ reward gaming
def episode_return(policy, steps: int = 150, seed: int = 5) -> float:
    cfg = load("env.image.height=32", "env.image.width=32", f"env.max_episode_steps={steps}").env
    env = make(cfg)
    obs, _ = env.reset(seed=seed)
    total, done, t = 0.0, False, 0
    while not done:
        obs, r, term, trunc, _ = env.step(policy(obs, t))
        total += r
        t += 1
        done = term or trunc
    env.close()
    return total


@pytest.fixture(scope="module")
def pid_return() -> float:
    cfg = load("agent=pid")
    pid = PIDAgent(cfg.agent.pid, cfg.env.lane_points, 1 / cfg.env.policy_frequency, num_envs=1)
    return episode_return(lambda obs, t: pid.act({"state": obs["state"][None]})[0])


@pytest.mark.parametrize("name, policy", [
    ("stand still", lambda obs, t: np.array([0.0, -1.0], np.float32)),
    ("circle", lambda obs, t: np.array([1.0, 0.3], np.float32)),
    ("straight off the lane", lambda obs, t: np.array([0.0, 1.0], np.float32)),
    ("weave", lambda obs, t: np.array([np.sin(t / 3.0), 0.5], np.float32)),
])
def test_scripted_exploits_score_below_the_pid_baseline(name: str, policy, pid_return: float) -> None:
    assert episode_return(policy) < pid_return, f"'{name}' games the reward"


@pytest.mark.parametrize("arm, name, clip, critics", [("td3", "td3", 1.5, 2), ("td3_noclip", "td3", None, 2),
                                                       ("ddpg", "ddpg", 1.5, 1), ("pid", "pid", 1.5, 2)])
def test_td3_components_arms_are_whole_configurations(arm: str, name: str, clip, critics: int) -> None:
    cfg = load(f"arm={arm}")
    assert (cfg.agent.name, cfg.agent.clip.actor, cfg.agent.num_critics) == (name, clip, critics)


@pytest.mark.parametrize("arm, mode, actor", [("td3_noclip", "norm", None), ("td3", "norm", 1.5),
                                              ("td3_adaptive", "adaptive", 1.5), ("td3_zscore", "zscore", 1.5)])
def test_clip_study_arms_set_the_clip_mode(arm: str, mode: str, actor) -> None:
    cfg = load(f"arm={arm}")
    assert (cfg.agent.name, cfg.agent.clip.mode, cfg.agent.clip.actor) == ("td3", mode, actor)


def test_td3_components_study_sweeps_the_arms_and_seeds() -> None:
    from hydra import compose, initialize_config_dir

    from tests.test_config import CONF
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=td3_components"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["arm"] == "td3,td3_noclip,ddpg,pid" and params["seed"] == "0,1,2"
    assert cfg.experiment_name == "td3_components"
