"""Stable-Baselines3, the reference implementation the bench measures ours against: its ``TD3.train()`` on a
filled replay buffer, its ``ReplayBuffer``'s memory, and its ``TD3.learn()`` on our registered env. Every function
raises ImportError without SB3 (the benchmark-only extra ``pip install '.[bench]'``); the callers skip the row."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from av_td3.bench.config import BenchConfig, fixed_config
from av_td3.bench.machine import quiet, sync

if TYPE_CHECKING:
    import gymnasium as gym

    from av_td3.config import Config, EnvConfig


def image_env(cfg: BenchConfig) -> gym.Env:
    """An env with our image observation (uint8[stack, height, width]) and action (float32[2] in [-1, 1]) at the
    fixed sizes of ``cfg``; only its spaces matter: SB3 builds its policy and replay buffer from them."""
    import gymnasium as gym

    class RandomImageEnv(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (cfg.stack, cfg.height, cfg.width), np.uint8)
        action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    return RandomImageEnv()


def sb3_updater(cfg: BenchConfig, device: torch.device) -> Callable[[int], float]:
    """``run(n)`` → seconds for SB3's ``TD3.train(gradient_steps=n)`` (which samples its replay buffer itself), a
    ``CnnPolicy`` matching our ``separate`` agent at the fixed sizes: NatureCNN with our ``features_dim``,
    ``net_arch`` = our hidden sizes, ``share_features_extractor=False``, our batch, learning rate, tau, gamma,
    policy delay and target noise; its buffer filled with ``cfg.fill`` random uint8 frames."""
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.torch_layers import NatureCNN

    a = fixed_config(cfg, "separate").agent
    model = SB3TD3(
        "CnnPolicy", image_env(cfg), learning_rate=a.lr.critic, buffer_size=cfg.fill + 10, learning_starts=0,
        batch_size=a.batch_size, tau=a.tau, gamma=a.gamma, policy_delay=a.policy_freq,
        target_policy_noise=a.policy_noise, target_noise_clip=a.noise_clip, seed=cfg.seed, device=device,
        policy_kwargs=dict(net_arch=[a.hidden_dim] * a.hidden_layers, features_extractor_class=NatureCNN,
                           features_extractor_kwargs=dict(features_dim=a.features_dim),
                           share_features_extractor=False))
    model.set_logger(Logger(folder=None, output_formats=[]))  # records in memory only: no files
    rng = np.random.default_rng(cfg.seed)
    shape = (1, cfg.stack, cfg.height, cfg.width)
    buffer = model.replay_buffer
    assert buffer is not None  # SB3 builds it in the constructor (_setup_model)
    for _ in range(cfg.fill):
        frames = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
        buffer.add(frames[0], frames[1], rng.uniform(-1, 1, (1, 2)).astype(np.float32),
                   rng.standard_normal(1).astype(np.float32), np.zeros(1, dtype=np.float32), [{}])

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.train(gradient_steps=n, batch_size=a.batch_size)
        sync(device)
        return time.perf_counter() - start

    return run


def sb3_replay_bytes(cfg: BenchConfig, optimize_memory_usage: bool) -> float:
    """Bytes per transition SB3's ReplayBuffer allocates for our image observation (its CnnPolicy input, the
    stacked frames; no state vector) and action: the nbytes of every array it holds / buffer_size."""
    from stable_baselines3.common.buffers import ReplayBuffer as SB3Replay

    env = image_env(cfg)
    buf = SB3Replay(cfg.replay_capacity, env.observation_space, env.action_space, device="cpu", n_envs=1,
                    optimize_memory_usage=optimize_memory_usage, handle_timeout_termination=not optimize_memory_usage)
    total = sum(v.nbytes for v in vars(buf).values() if isinstance(v, np.ndarray))
    return total / buf.buffer_size


def gym_kwargs(env_cfg: EnvConfig) -> dict[str, Any]:
    """``gymnasium.make("av_td3/Highway-v0", **kwargs)`` arguments for ``env_cfg``: the fields that differ from the
    schema's defaults (the embedded simulator's; nested configs as dicts)."""
    from av_td3.config import EnvConfig

    schema = EnvConfig()
    kwargs = {}
    for f in dataclasses.fields(env_cfg):
        value = getattr(env_cfg, f.name)
        if f.name not in ("camera", "route") and value != getattr(schema, f.name):  # CARLA only
            is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)  # an instance: a section
            kwargs[f.name] = dataclasses.asdict(value) if is_section else value
    return kwargs


def sb3_learn(conf: Config, device: torch.device) -> tuple[list[float], float]:
    """Stable-Baselines3's ``TD3.learn()`` on ``gymnasium.make("av_td3/Highway-v0")`` with ``conf``'s env and
    sizes: ``MultiInputPolicy`` (NatureCNN on the image with ``features_dim`` outputs, the state flattened next to
    it), ``net_arch`` = our hidden layers, one extractor shared by actor and critic, batch size, learning rate,
    tau, gamma, policy delay, target noise and Gaussian exploration noise as ours, one gradient step per env step
    after ``learning_starts`` random steps. Returns env steps/s of each ``log_every`` steps after learning starts
    (the same windows as ours) and the wall time of ``learn()`` in seconds."""
    import gymnasium as gym
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.noise import NormalActionNoise

    from av_td3.envs import HIGHWAY_ID

    a, t = conf.agent, conf.trainer
    env = gym.make(HIGHWAY_ID, disable_env_checker=True, **gym_kwargs(conf.env))
    model = SB3TD3(
        "MultiInputPolicy", env, learning_rate=a.lr.critic, buffer_size=a.buffer_size,
        learning_starts=t.learning_starts, batch_size=a.batch_size, tau=a.tau, gamma=a.gamma, train_freq=1,
        gradient_steps=t.updates_per_step, policy_delay=a.policy_freq, target_policy_noise=a.policy_noise,
        target_noise_clip=a.noise_clip, seed=conf.seed, device=device,
        action_noise=NormalActionNoise(np.zeros(2), np.full(2, a.exploration_noise)),
        policy_kwargs=dict(net_arch=[a.hidden_dim] * a.hidden_layers,
                           features_extractor_kwargs=dict(cnn_output_dim=a.features_dim),
                           share_features_extractor=True))
    model.set_logger(Logger(folder=None, output_formats=[]))  # records in memory only: no files
    stamps: dict[int, float] = {}

    class Stamps(BaseCallback):
        def _on_step(self) -> bool:  # called after each env step, before that step's gradient step
            if self.num_timesteps % t.log_every == 0:
                stamps[self.num_timesteps] = time.perf_counter()
            return True

    start = time.perf_counter()
    with quiet("av_td3.envs"):
        model.learn(total_timesteps=t.total_steps, callback=Stamps())
    wall = time.perf_counter() - start
    env.close()
    ends = range(t.learning_starts + t.log_every, t.total_steps + 1, t.log_every)
    return [t.log_every / (stamps[s] - stamps[s - t.log_every]) for s in ends], wall
