"""The one environment contract every backend (embedded highway-env, CARLA) follows.

Observation: ``{"image": uint8[stack, H, W] grayscale frames (oldest first), "state": float32[STATE_DIM(K)]}``.
Action: ``[steer, throttle_brake]`` in [-1, 1]^2 (steer > 0 turns left; throttle_brake > 0 accelerates, < 0
brakes).
``info`` holds the keys in :data:`INFO_KEYS` on every step, plus ``reward_components`` (dict of floats, the
backend's :attr:`~av_td3.envs.backends.Backend.reward_components`) and ``termination`` (why the episode
terminated: ``collision``, ``off_road`` or the backend's episode rule; "" otherwise). Terminate on collision,
leaving the road or a broken episode rule; truncate at ``env.max_episode_steps``, at the route's end, or when the
simulator was lost mid-step (bootstrap on truncation only). :class:`DrivingEnv` decides both from the
:class:`DrivingSignals` the backend reports.

State vector layout, all in SI units in the ego frame (x forward, y left):
``[speed m/s, lateral_offset m (left of lane centre > 0), heading_error rad (car heading - lane heading, wrapped
to [-pi, pi]), lead_gap m, lead_closing_speed m/s, x_1, y_1, ..., x_K, y_K]`` where (x_k, y_k) are the next K
lane-centre points and the lead entries describe the nearest other vehicle ahead in the ego's lane (see
:func:`lead_vehicle`): the distance along the lane, centre to centre, and how fast it shrinks (> 0: closing in).
With no vehicle within :data:`LEAD_RANGE_M` the gap reads ``LEAD_RANGE_M`` and the closing speed 0.
A backend may append entries of its own after the lane points (its declared ``state_tail``, see
:mod:`av_td3.envs.backends`): the layout above, and so :func:`lane_point_slice`, holds for every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from av_td3.config import RewardConfig

ACTION_NAMES = ("steer", "throttle_brake")
REWARD_COMPONENTS = ("efficiency", "lane_keeping", "comfort", "safety", "progress")
# ``interrupted``: the step never happened (the simulator was lost mid-step); the episode ends there, truncated, and
# the trainer neither stores the step, nor counts the episode, nor scores it in an evaluation.
INFO_KEYS = ("collision", "lane_invasion", "off_road", "speed", "progress", "interrupted")

SPEED, LATERAL, HEADING, LEAD_GAP, LEAD_CLOSING = 0, 1, 2, 3, 4
STATE_HEAD = 5
LEAD_RANGE_M = 50.0  # how far ahead the lead vehicle is looked for (the frame shows 25 m ahead)
LEAD_PATH_SPACING_M = 2.0  # spacing of the lane-centre path the lead vehicle is looked for along
LEAD_PATH_STEPS = int(LEAD_RANGE_M / LEAD_PATH_SPACING_M)  # path points after the ego's own: it spans the range


class EnvUnavailableError(RuntimeError):
    """The simulator cannot be started or reached. The message says what to do (start the server, install an
    extra); the launcher prints it without a traceback and exits non-zero."""


class SimulatorLostError(RuntimeError):
    """The simulator went away mid-run and reconnecting failed; the trainer checkpoints and exits non-zero."""


class SimulatorUnusableError(RuntimeError):
    """The simulator answers but cannot be used as configured (a port another program holds, a start another
    client's car occupies, a map the server lacks): retrying cannot help. The message names the cause and the fix;
    mid-run the trainer checkpoints first, and the run exits non-zero."""


class StopRequested(RuntimeError):
    """A backend stopped waiting for a lost simulator because the run is stopping (a stop signal is pending): the
    trainer raises the signal's own stop instead of restarting anything."""


def state_dim(lane_points: int, tail: int = 0) -> int:
    """Entries of the state vector: the head, ``lane_points`` (x, y) pairs and ``tail`` backend entries."""
    return STATE_HEAD + 2 * lane_points + tail


def lane_point_slice(lane_points: int) -> slice:
    return slice(STATE_HEAD, STATE_HEAD + 2 * lane_points)


def state_scale(lane_points: int, lane_point_spacing: float) -> np.ndarray:
    """Typical magnitudes of each state entry; networks divide by these so inputs are O(1)."""
    reach = max(lane_points * lane_point_spacing, 1.0)
    return np.array([10.0, 2.0, 1.0, LEAD_RANGE_M, 5.0] + [reach] * (2 * lane_points), dtype=np.float32)


def observation_space(stack: int, height: int, width: int, lane_points: int, tail: int = 0) -> gym.spaces.Dict:
    return gym.spaces.Dict({
        "image": gym.spaces.Box(0, 255, shape=(stack, height, width), dtype=np.uint8),
        "state": gym.spaces.Box(-np.inf, np.inf, shape=(state_dim(lane_points, tail),), dtype=np.float32),
    })


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, shape=(len(ACTION_NAMES),), dtype=np.float32)


def wrap_angle(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def to_ego_frame(points_xy: np.ndarray, ego_xy: np.ndarray, ego_heading: float) -> np.ndarray:
    """World points [N, 2] → ego frame (x forward, y left) for a car at ``ego_xy`` heading ``ego_heading`` (rad,
    counter-clockwise from the world x axis). Backends with a left-handed world (CARLA) flip y before calling."""
    d = np.asarray(points_xy, dtype=np.float64) - np.asarray(ego_xy, dtype=np.float64)
    c, s = math.cos(ego_heading), math.sin(ego_heading)
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


def lead_vehicle(path_xy: np.ndarray, half_width: float, ego_speed: float, others_xy: np.ndarray,
                 others_velocity: np.ndarray) -> tuple[float, float]:
    """(gap m, closing speed m/s) to the nearest other vehicle ahead in the ego's lane.

    ``path_xy`` [P, 2] is the lane centre from the ego's own projection on it onwards (so arc length 0 is the
    ego), ``others_xy`` [N, 2] and ``others_velocity`` [N, 2] the other vehicles, all in one world frame (its
    handedness does not matter). A vehicle counts when its projection on the path lies within the path and
    less than ``half_width`` from the centre line. The closing speed is ``ego_speed`` (along the lane) minus
    the other's velocity along the path there. None found: ``(LEAD_RANGE_M, 0.0)``."""
    path = np.asarray(path_xy, dtype=np.float64)
    others = np.asarray(others_xy, dtype=np.float64).reshape(-1, 2)
    if len(others) == 0 or len(path) < 2:
        return LEAD_RANGE_M, 0.0
    seg = np.diff(path, axis=0)  # [S, 2]
    seg_len = np.maximum(np.hypot(seg[:, 0], seg[:, 1]), 1e-9)
    rel = others[:, None, :] - path[None, :-1, :]  # [N, S, 2]
    t = (rel * seg).sum(-1) / seg_len ** 2  # position along each segment, 0..1 on it
    distance = np.hypot(*np.moveaxis(rel - np.clip(t, 0.0, 1.0)[..., None] * seg, -1, 0))
    k = np.argmin(distance, axis=1)  # the nearest segment of each vehicle
    rows = np.arange(len(others))
    t_k = t[rows, k]
    inside = ((k > 0) | (t_k >= 0.0)) & ((k < len(seg) - 1) | (t_k <= 1.0))  # not behind the ego, nor past the end
    in_lane = inside & (distance[rows, k] < half_width)
    if not in_lane.any():
        return LEAD_RANGE_M, 0.0
    arc = np.concatenate([[0.0], np.cumsum(seg_len)])[k] + np.clip(t_k, 0.0, 1.0) * seg_len[k]
    arc = np.where(in_lane, arc, np.inf)
    i = int(np.argmin(arc))
    if arc[i] > LEAD_RANGE_M:
        return LEAD_RANGE_M, 0.0
    direction = seg[k[i]] / seg_len[k[i]]
    return float(arc[i]), float(ego_speed - np.asarray(others_velocity, dtype=np.float64).reshape(-1, 2)[i] @ direction)


@dataclass
class DrivingSignals:
    """What a backend measures on one step; the reward and ``info`` are computed from it alone."""
    speed: float                # m/s, signed along the car's heading
    speed_along_lane: float     # m/s, component of velocity along the lane direction
    lateral_offset: float       # m, left of lane centre > 0
    lane_half_width: float      # m
    heading_error: float        # rad, wrapped to [-pi, pi]
    collision: bool
    off_road: bool
    lane_invasion: bool         # crossed a lane marking this step
    progress: float             # m travelled along the route this step (negative when going backwards)
    rule: str = ""              # the backend's episode rule this step broke (terminates the episode), "" none
    route_done: bool = False    # the route's end is reached (truncates: a good end, not a terminal state)
    interrupted: bool = False   # the simulator was lost mid-step and is back: the episode ends as truncated


def termination(s: DrivingSignals) -> str:
    """Why a step with these signals ends the episode as terminated ("" when it does not): a collision first,
    then leaving the road, then the backend's episode rule."""
    if s.interrupted:
        return ""
    return "collision" if s.collision else "off_road" if s.off_road else s.rule


class RewardFunction:
    """The seed system's reward components, each weighted by ``env.reward.*``, plus one term per episode rule in
    ``rules`` (the backend's; none on the embedded simulator).

    efficiency   = w * clip(speed_along_lane / target_speed, -1, 1)
    lane_keeping = -w * (min(|offset| / half_width, 2) + |heading_error| / (pi/2))
    comfort      = -w * min(|jerk| / 10, 10)          (jerk from the speed history, m/s^3)
    safety       = -collision_penalty * collision - offroad_penalty * off_road - lane_invasion_penalty * invasion
    progress     = w * metres travelled along the route this step
    <rule>       = -<rule>_penalty on the step that rule ends the episode (e.g. red_light: -red_light_penalty)
    """

    def __init__(self, cfg: RewardConfig, dt: float, rules: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.dt = dt
        self.rules = rules
        self.components = REWARD_COMPONENTS + rules
        self.reset()

    def reset(self) -> None:
        self._prev_speed: float | None = None
        self._prev_accel: float | None = None

    def __call__(self, s: DrivingSignals) -> tuple[float, dict[str, float]]:
        c = self.cfg
        accel = None if self._prev_speed is None else (s.speed - self._prev_speed) / self.dt
        jerk = 0.0 if accel is None or self._prev_accel is None else (accel - self._prev_accel) / self.dt
        self._prev_speed, self._prev_accel = s.speed, accel
        half = max(s.lane_half_width, 1e-3)
        components = {
            "efficiency": c.efficiency * float(np.clip(s.speed_along_lane / c.target_speed, -1.0, 1.0)),
            "lane_keeping": -c.lane_keeping * (min(abs(s.lateral_offset) / half, 2.0)
                                               + abs(s.heading_error) / (math.pi / 2)),
            "comfort": -c.comfort * min(abs(jerk) / 10.0, 10.0),
            "safety": -(c.collision_penalty * float(s.collision) + c.offroad_penalty * float(s.off_road)
                        + c.lane_invasion_penalty * float(s.lane_invasion)),
            "progress": c.progress * s.progress,
        }
        for rule in self.rules:
            components[rule] = -rule_penalty(c, rule) * float(s.rule == rule)
        return float(sum(components.values())), components


def rule_penalty(reward: RewardConfig, rule: str) -> float:
    """``env.reward.<rule>_penalty``: what breaking episode rule ``rule`` costs."""
    return float(getattr(reward, f"{rule}_penalty"))


def make_info(s: DrivingSignals, components: dict[str, float], termination: str = "") -> dict:
    return {"collision": bool(s.collision), "lane_invasion": bool(s.lane_invasion), "off_road": bool(s.off_road),
            "speed": float(s.speed), "progress": float(s.progress), "interrupted": bool(s.interrupted),
            "reward_components": dict(components), "termination": termination}


def interrupted_info(components: tuple[str, ...]) -> dict:
    """``info`` of a step the simulator was lost in: nothing happened, nothing was earned."""
    still = DrivingSignals(speed=0.0, speed_along_lane=0.0, lateral_offset=0.0, lane_half_width=0.0,
                           heading_error=0.0, collision=False, off_road=False, lane_invasion=False, progress=0.0,
                           interrupted=True)
    return make_info(still, dict.fromkeys(components, 0.0))


class DrivingEnv(gym.Env):
    """Shared half of every backend: frame stacking, reward, info, termination and truncation, action guard.

    A backend implements :meth:`_sim_reset` and :meth:`_sim_step`, each returning the newest grayscale frame
    (uint8[H, W]), the state vector (float32, the layout above plus ``state_tail`` more entries) and the
    :class:`DrivingSignals` of that step; after a lost simulator, :meth:`_sim_step` returns the last good frame and
    state with ``interrupted`` set. ``rules`` are the backend's episode rules (each its own reward term);
    :meth:`_info_extra` adds backend-specific ``info`` keys.
    """

    metadata = {"render_modes": []}

    def __init__(self, height: int, width: int, stack: int, lane_points: int, max_episode_steps: int,
                 reward: RewardConfig, dt: float, rules: tuple[str, ...] = (), state_tail: int = 0) -> None:
        self.observation_space = observation_space(stack, height, width, lane_points, state_tail)
        self.action_space = action_space()
        self.stack = stack
        self.max_episode_steps = max_episode_steps
        self.reward_fn = RewardFunction(reward, dt, rules)
        self._frames = np.zeros((stack, height, width), dtype=np.uint8)
        self._t = 0

    # --- backend hooks -------------------------------------------------------------------------------------
    def _sim_reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        raise NotImplementedError

    def _sim_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        raise NotImplementedError

    # --- gymnasium API -------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        frame, state, signals = self._sim_reset(seed)
        self._frames[:] = frame  # an episode starts with its first frame repeated (the replay buffer agrees)
        self._t = 0
        self.reward_fn.reset()
        self.reward_fn(signals)  # primes the speed history so the first step's jerk is well defined
        return self._obs(state), self._info(signals, dict.fromkeys(self.reward_fn.components, 0.0))

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float32).reshape(self.action_space.shape)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"non-finite action {action.tolist()} refused before it reached the simulator")
        frame, state, signals = self._sim_step(np.clip(action, -1.0, 1.0))
        self._t += 1
        if signals.interrupted:
            # An interruption, not a failure: the episode ends as truncated (the learner bootstraps) on the last
            # good observation (the frame stack is left as it was), with nothing earned.
            return self._obs(state), 0.0, False, True, self._info(
                signals, dict.fromkeys(self.reward_fn.components, 0.0))
        self._frames[:-1] = self._frames[1:]
        self._frames[-1] = frame
        reward, components = self.reward_fn(signals)
        why = termination(signals)
        truncated = not why and (signals.route_done or self._t >= self.max_episode_steps)
        return self._obs(state), reward, bool(why), truncated, self._info(signals, components, why)

    def _obs(self, state: np.ndarray) -> dict:
        return {"image": self._frames.copy(), "state": np.asarray(state, dtype=np.float32)}

    def _info(self, signals: DrivingSignals, components: dict[str, float], why: str = "") -> dict:
        return {**make_info(signals, components, why), **self._info_extra()}

    def _info_extra(self) -> dict:
        """Backend-specific ``info`` keys added to every step's and reset's (e.g. CARLA's reconnect count)."""
        return {}


MAX_SPEED_M_S = 40.0  # no backend's car goes faster; bounds the progress term per step


def max_abs_reward(reward: RewardConfig, decision_dt: float, rules: tuple[str, ...] = ()) -> float:
    """Largest per-step |reward| :class:`RewardFunction` can produce; with gamma it bounds |Q| (alerts, validator).

    Each component is bounded separately and the bounds summed: efficiency <= w (speed ratio clipped to [-1, 1]);
    lane keeping <= w * (2 + 2) (offset term capped at 2, |heading error| <= pi gives 2); comfort <= w * 10 (jerk
    term capped); safety <= the three penalties together; progress <= w * metres covered in one decision at
    MAX_SPEED_M_S; the episode rules ``rules`` <= the largest of their penalties (a step breaks one rule at most)."""
    return (abs(reward.efficiency) + abs(reward.lane_keeping) * 4.0 + abs(reward.comfort) * 10.0
            + reward.collision_penalty + reward.offroad_penalty + reward.lane_invasion_penalty
            + abs(reward.progress) * MAX_SPEED_M_S * decision_dt
            + max((rule_penalty(reward, r) for r in rules), default=0.0))
