"""Classical baseline (``agent=pid``): PID on speed + pure pursuit on the observation's lane-centre points.

No learning and no images: it reads the state vector of the env contract (speed, and the next K lane-centre
points in the ego frame), so it runs through the same launch, evaluation, logging and run folder as TD3.
"""

from __future__ import annotations

import numpy as np

from av_td3.agent.base import Flush, Health
from av_td3.agent.monitor import NonFiniteError
from av_td3.config import PidConfig
from av_td3.envs.base import SPEED, lane_point_slice


class PIDAgent:
    """Longitudinal PID on ``target_speed`` and lateral pure pursuit with a ``lookahead`` distance; implements
    :class:`av_td3.agent.base.Agent` without learning (no replay, no updates, nothing to measure)."""

    learning = False

    def __init__(self, cfg: PidConfig, lane_points: int, dt: float, num_envs: int) -> None:
        self.cfg = cfg
        self.points = lane_point_slice(lane_points)
        self.dt = dt
        self._integral = np.zeros(num_envs)
        self._prev_error = np.full(num_envs, np.nan)

    def reset(self, env_ids: np.ndarray) -> None:
        """A new episode for these envs: forget their integral and derivative history."""
        self._integral[env_ids] = 0.0
        self._prev_error[env_ids] = np.nan

    def act(self, obs: dict[str, np.ndarray], noise: float = 0.0) -> np.ndarray:
        """obs["state"] [n, k] → actions [n, 2] = [steer, throttle_brake]; ``noise`` is ignored (deterministic)."""
        state = np.asarray(obs["state"], dtype=np.float64)
        return np.stack([self._steer(state), self._throttle(state)], axis=1).astype(np.float32)

    def _throttle(self, state: np.ndarray) -> np.ndarray:
        c = self.cfg
        error = c.target_speed - state[:, SPEED]
        # anti-windup: the integral alone can never ask for more than full throttle or brake
        self._integral = np.clip(self._integral + error * self.dt, -1.0 / max(c.ki, 1e-9), 1.0 / max(c.ki, 1e-9))
        derivative = np.where(np.isnan(self._prev_error), 0.0, (error - self._prev_error) / self.dt)
        self._prev_error = error
        return np.clip(c.kp * error + c.ki * self._integral + c.kd * derivative, -1.0, 1.0)

    def _steer(self, state: np.ndarray) -> np.ndarray:
        c = self.cfg
        pts = state[:, self.points].reshape(state.shape[0], -1, 2)  # [n, K, (x forward, y left)]
        dist = np.linalg.norm(pts, axis=2)
        # the first lane point at least `lookahead` ahead (the farthest one if none is)
        ahead = (dist >= c.lookahead) & (pts[:, :, 0] > 0)
        idx = np.where(ahead.any(axis=1), ahead.argmax(axis=1), dist.argmax(axis=1))
        target = pts[np.arange(len(idx)), idx]
        ld = np.maximum(np.linalg.norm(target, axis=1), 1e-3)
        alpha = np.arctan2(target[:, 1], target[:, 0])
        delta = np.arctan2(2.0 * c.wheelbase * np.sin(alpha), ld)  # pure pursuit: steer angle for the arc
        return np.clip(delta / c.max_steer_rad, -1.0, 1.0)

    def update(self, batch: object, step: int) -> None:
        raise TypeError("agent=pid learns nothing: the trainer never calls update() on an agent with learning=False")

    def flush(self, step: int) -> Flush:
        return Flush({})

    def health(self) -> Health:
        return Health()

    def for_evaluation(self) -> "PIDAgent":
        """A fresh controller for one evaluation episode, leaving the training envs' integrators alone."""
        return PIDAgent(self.cfg, (self.points.stop - self.points.start) // 2, self.dt, num_envs=1)

    def check_action(self, action: np.ndarray, step: int) -> np.ndarray:
        if not np.all(np.isfinite(action)):
            raise NonFiniteError("PID action (is the state vector finite?)", step)
        return action

    def state_dict(self) -> dict:
        return {"integral": self._integral.copy(), "prev_error": self._prev_error.copy()}

    def load_state_dict(self, d: dict) -> None:
        self._integral, self._prev_error = d["integral"].copy(), d["prev_error"].copy()


