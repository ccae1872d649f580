"""What each env backend is, declared without building its simulator: ``backend(cfg).eval_shares_env`` and friends.

The trainer, the bounds and :func:`av_td3.envs.make` ask a backend's :class:`Backend` instead of branching on
``env.name``. Importing this module imports no backend (neither highway-env nor the ``carla`` client, nor their
modules here): each backend's module is imported by :meth:`Backend.build` only.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from av_td3.config import ConfigError, EnvConfig
from av_td3.config.tree import flatten
from av_td3.envs import base

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One env backend's declaration.

    ``section``: its own config section under ``env`` (``env.carla.*``), or None; ``own_keys``: the shared
    ``env.*`` keys only it reads. A changed key of another backend's is warned about as ignored (see
    :func:`warn_ignored`). ``eval_shares_env``: its world is one per server, so evaluation drives the training
    env (and the training episode starts afresh after it) instead of a separate instance, and ``env.num_envs``
    must be 1. ``rules``: its episode rules beyond collision and leaving the road, each a termination reason and
    a reward term (``env.reward.<rule>_penalty``). ``state_tail``: (name, typical magnitude) of the state entries
    it appends after the lane points. ``dt``: seconds between two agent decisions for a config.
    ``factory``: ``module:class`` of its env, built as ``cls(cfg, seed=seed)``.
    """
    name: str
    factory: str
    dt: Callable[[EnvConfig], float]
    eval_shares_env: bool = False
    section: str | None = None
    own_keys: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    state_tail: tuple[tuple[str, float], ...] = ()

    @property
    def reward_components(self) -> tuple[str, ...]:
        """Keys of ``info["reward_components"]``: the common terms, then one per episode rule."""
        return base.REWARD_COMPONENTS + self.rules

    def decision_dt(self, cfg: EnvConfig) -> float:
        """Seconds between two agent decisions."""
        return self.dt(cfg)

    def state_dim(self, cfg: EnvConfig) -> int:
        """Length of the observation's ``state`` vector (the layout in :mod:`av_td3.envs.base` + ``state_tail``)."""
        return base.state_dim(cfg.lane_points, len(self.state_tail))

    def state_scale(self, cfg: EnvConfig) -> np.ndarray:
        """float32[state_dim]: typical magnitude of each state entry; networks divide by it so inputs are O(1)."""
        tail = np.array([scale for _, scale in self.state_tail], dtype=np.float32)
        return np.concatenate([base.state_scale(cfg.lane_points, cfg.lane_point_spacing), tail])

    def build(self, cfg: EnvConfig, seed: int | None) -> gym.Env:
        module, cls = self.factory.split(":")
        return getattr(importlib.import_module(module), cls)(cfg, seed=seed)


def highway_decision_dt(cfg: EnvConfig) -> float:
    """Seconds between two decisions in highway-env: it integrates ``simulation_frequency // policy_frequency``
    physics steps of ``1 / simulation_frequency`` s per action (``AbstractEnv._simulate``), so 15 and 4 give
    0.2 s, not 1/4 s. The env's reward (jerk), the PID baseline and the Q bound all use this one formula."""
    return (cfg.simulation_frequency // cfg.policy_frequency) / cfg.simulation_frequency


HIGHWAY = Backend(
    name="highway", factory="av_td3.envs.highway:HighwayDrivingEnv",
    dt=highway_decision_dt,
    own_keys=("view", "bev", "simulation_frequency", "policy_frequency"))

CARLA = Backend(
    name="carla", factory="av_td3.envs.carla:CarlaDrivingEnv",
    dt=lambda cfg: cfg.carla.fixed_delta_s,  # one step is one synchronous tick
    # A CARLA server runs one synchronous world: a second env on it would tick the training one.
    eval_shares_env=True, section="carla",
    rules=("route_deviation", "wrong_way", "blocked", "red_light"),
    # The traffic light ahead (av_td3/envs/carla/lights.py): metres to its stop line, looked for as far as the lead
    # vehicle, and its colour as the need to stop (red 1, yellow 0.5, green 0).
    state_tail=(("light_distance", base.LEAD_RANGE_M), ("light_colour", 1.0)))

BACKENDS: dict[str, Backend] = {b.name: b for b in (HIGHWAY, CARLA)}


def backend(cfg: EnvConfig | Any) -> Backend:
    """The declaration of ``cfg.name``'s backend (``cfg``: an :class:`EnvConfig` or a composed ``env`` node)."""
    try:
        return BACKENDS[cfg.name]
    except KeyError:
        raise ConfigError(f"env.name={cfg.name!r} is not valid: choose one of {', '.join(BACKENDS)} "
                          f"(e.g. `env.name={next(iter(BACKENDS))}`).") from None


def warn_ignored(cfg: EnvConfig) -> list[str]:
    """Warn about (and return) the keys of other backends that ``cfg`` changes from their defaults: the chosen
    backend never reads them."""
    chosen, defaults = backend(cfg), EnvConfig()
    changed: list[str] = []
    for other in BACKENDS.values():
        if other is chosen:
            continue
        changed += [f"env.{k}" for k in other.own_keys if getattr(cfg, k) != getattr(defaults, k)]
        if other.section:
            mine, default = flatten(getattr(cfg, other.section)), flatten(getattr(defaults, other.section))
            changed += [f"env.{other.section}.{k}" for k, v in mine.items() if v != default[k]]
    if changed:
        log.warning("%s: settings of another backend, ignored by env.name=%s.", ", ".join(changed), chosen.name)
    return changed
