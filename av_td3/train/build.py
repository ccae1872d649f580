"""Construction of everything a run needs from its config: device, seeds, envs, agent, replay buffer.

Shapes are passed to constructors (:func:`agent_spec`), never written into the config.
"""

from __future__ import annotations

import logging
import random

import gymnasium as gym
import numpy as np
import torch

from av_td3 import envs as envs_lib
from av_td3.agent.base import Agent
from av_td3.agent.pid import PIDAgent
from av_td3.agent.td3 import TD3, Spec
from av_td3.config import Config, ConfigError, EnvConfig
from av_td3.envs.base import ACTION_NAMES, EnvUnavailableError
from av_td3.replay import ReplayBuffer

log = logging.getLogger("av_td3.train")  # the trainer's log lines carry one name, whichever module writes them


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto (CUDA when available), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available: use trainer.device=auto or cpu.")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def agent_spec(e: EnvConfig) -> Spec:
    """The shapes the agent is built for, from the env config and its backend's state layout (also used by
    ``av-td3 bench``)."""
    declared = envs_lib.backend(e)
    return Spec(stack=e.image.stack, height=e.image.height, width=e.image.width, state_dim=declared.state_dim(e),
                action_dim=len(ACTION_NAMES), state_scale=declared.state_scale(e), action_names=ACTION_NAMES)


def eval_shares_env(e: EnvConfig) -> bool:
    """Whether evaluation must run in the training env, as the backend declares: a CARLA server runs one
    synchronous world, so evaluation uses the training env's connection (and restarts the training episode
    afterwards); the embedded simulator gets a separate eval instance."""
    return envs_lib.backend(e).eval_shares_env


def make_envs(e: EnvConfig) -> tuple[gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv, gym.Env]:
    """The training envs (``env.num_envs``) and the evaluation env, which is the first training env when
    :func:`eval_shares_env`. Built before the replay buffer and the networks: a bad env.town or an unreachable
    server fails in seconds, before memory is allocated."""
    shares = eval_shares_env(e)
    if shares and e.num_envs > 1:
        raise ConfigError(f"env.num_envs={e.num_envs} with env={e.name}: one {e.name} server runs one env. Use "
                          "env.num_envs=1 and run several jobs, one server each (see docs/carla.md, 'Sweeps: one "
                          "server per parallel job').")
    train_envs = envs_lib.make_vector(e, e.num_envs)
    try:
        if not shares:
            return train_envs, envs_lib.make(e)
        assert isinstance(train_envs, gym.vector.SyncVectorEnv)  # num_envs is 1: make_vector built it in-process
        return train_envs, train_envs.envs[0]
    except BaseException:
        train_envs.close()  # a CARLA env restores the server's settings on close
        raise


def make_agent(cfg: Config, spec: Spec, device: torch.device, q_bound: float) -> tuple[Agent, ReplayBuffer | None]:
    """The agent ``agent.name`` names, and the replay buffer it learns from (None for one that does not learn:
    agent=pid drives with a fixed controller, through the same loop otherwise)."""
    a, e = cfg.agent, cfg.env
    if a.name == "pid":
        log.info("agent=pid: PID speed control (target %.1f m/s) + pure pursuit; nothing is learned",
                 a.pid.target_speed)
        return PIDAgent(a.pid, e.lane_points, envs_lib.backend(e).decision_dt(e), e.num_envs), None
    image = (e.image.height, e.image.width)
    bpr = ReplayBuffer.bytes_per_row(image, spec.state_dim, spec.action_dim)
    buffer = ReplayBuffer(a.buffer_size, image, e.image.stack, spec.state_dim, spec.action_dim, num_envs=e.num_envs,
                          seed=cfg.seed, device=device)
    log.info("replay buffer: %d transitions, %d bytes per transition (%.1f MB allocated)",
             a.buffer_size, bpr, buffer.nbytes / 1e6)
    agent = TD3(a, cfg.monitor, spec, device, q_bound, seed=cfg.seed)
    for net, parts in agent.parts().items():
        for part, names in parts.items():
            # every parameter's name: for debugging (one line per optimizer part, too long for every start)
            log.debug("%s optimizer owns %s params: %s", net, part, ", ".join(names) if names else "(none)")
    return agent, buffer


def check_env(probe: gym.Env, space: gym.spaces.Dict, seed: int) -> None:
    """Stop before training on a black or frozen camera, or on observations the networks don't expect
    (``space``: the training envs' single observation space). Drives ``probe`` for a few steps."""
    o, _ = probe.reset(seed=seed)
    for key, want in space.items():
        assert isinstance(want, gym.spaces.Box)  # the contract's arrays (av_td3.envs.base.observation_space)
        got = o[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise EnvUnavailableError(f"observation '{key}' is {got.dtype}{list(got.shape)} but the "
                                      f"networks expect {want.dtype}{list(want.shape)}: the env backend "
                                      "breaks the contract in av_td3/envs/base.py.")
    first = o["image"][-1]
    if first.min() == first.max():
        raise EnvUnavailableError(
            f"the camera image is constant (every pixel = {first.min()}): the simulator is not drawing. With "
            "the embedded simulator check SDL_VIDEODRIVER (it must not be 'dummy'; av-td3 uses 'offscreen').")
    frames = [first]
    for _ in range(5):
        o, _, term, trunc, _ = probe.step(np.array([0.0, 0.5], dtype=np.float32))
        frames.append(o["image"][-1])
        if term or trunc:
            break
    if all(np.array_equal(frames[0], f) for f in frames[1:]):
        raise EnvUnavailableError("the camera image did not change over 5 steps of driving: the simulator's "
                                  "frames are frozen.")
