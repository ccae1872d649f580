"""Environment backends behind one contract (:mod:`av_td3.envs.base`), chosen by ``env.name``.

Importing this package registers ``av_td3/Highway-v0`` with gymnasium; CARLA is imported only when asked for,
so nothing here needs the ``carla`` package. ``backend(cfg)`` is what a backend declares about itself (whether
evaluation shares the training world, its decision interval, state layout, reward terms, config section): see
:mod:`av_td3.envs.backends`.

Vector envs (:func:`make_vector`) never reset on their own (``AutoresetMode.DISABLED``): the observation a
``step`` returns for a sub-env whose episode ended is that episode's final observation, and the caller resets
the ended sub-envs, each with its own seed: ``reset(seed=[s or None per env], options={"reset_mask": ended})``
(the other sub-envs keep their current observation in what it returns). Stepping an ended sub-env before that
reset is an error. This is how :mod:`av_td3.train` runs episodes, with per-episode seeds a resumed run replays.
"""

from __future__ import annotations

import gymnasium as gym

from av_td3.config import EnvConfig
from av_td3.envs.backends import BACKENDS, Backend, backend, warn_ignored
from av_td3.envs.base import DrivingEnv

__all__ = ["BACKENDS", "Backend", "DrivingEnv", "backend", "make", "make_vector", "warn_ignored"]

HIGHWAY_ID = "av_td3/Highway-v0"

if HIGHWAY_ID not in gym.registry:  # gymnasium warns when an id is registered again (module reloads)
    gym.register(id=HIGHWAY_ID, entry_point="av_td3.envs.highway:from_kwargs")


def make(cfg: EnvConfig, seed: int | None = None) -> gym.Env:
    """Build the ``env.name`` backend (its :class:`Backend` declaration says which class). A seed seeds the
    simulator's random stream (so unseeded ``reset()`` calls replay the same episodes) and the action space.
    Every backend follows the :class:`DrivingEnv` contract, but CARLA's env is not a subclass: it relays the calls
    to a :class:`DrivingEnv` in a worker process (:mod:`av_td3.envs.carla.worker`)."""
    declared = backend(cfg)
    warn_ignored(cfg)
    env = declared.build(cfg, seed)  # the simulator's packages are imported here, only for the chosen backend
    if seed is not None:
        env.action_space.seed(seed)
    return env


def make_vector(cfg: EnvConfig, num_envs: int) -> gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv:
    """``num_envs`` copies of ``make(cfg)``: in worker processes (AsyncVectorEnv), or in this one when
    ``num_envs == 1``. ``reset(seed=s)`` gives sub-env i the seed s + i. No autoreset: see the module doc."""
    fns = [lambda: make(cfg) for _ in range(num_envs)]
    mode = gym.vector.AutoresetMode.DISABLED
    if num_envs == 1:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    # forkserver: workers start clean instead of forking a trainer that may hold CUDA and torch threads. Like
    # spawn, it re-imports the main script in the workers: scripts need the `if __name__ == "__main__":` guard.
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="forkserver")
