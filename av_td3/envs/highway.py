"""The embedded simulator (``env.name=highway``): Farama highway-env 1.12 behind the :class:`DrivingEnv` contract.

``env.town`` picks the scene: ``racetrack`` (highway-env's racetrack-v0: a closed two-lane track, lane keeping
with traffic at 6-9 m/s) or ``highway`` (highway-fast-v0: a straight three-lane road, traffic at 20-30 m/s);
``env.npcs`` other vehicles, exactly (at most 30 fit on the racetrack). highway-env moves the
traffic and the ego car; this module maps our action onto its ``ContinuousAction``, has the frame drawn by the
``env.view`` of :mod:`av_td3.envs.views` and reads the :class:`DrivingSignals` off its vehicle and lanes.

Handedness: highway-env's world is drawn with y pointing *down*, so its positive lateral offset, heading change
and steering angle are to the driver's *right* as seen in the frame. They are flipped here so the contract holds:
ego frame x forward, y left; ``lateral_offset > 0`` left of the lane centre; ``steer > 0`` turns left.

Frames (``env.view``): ``world``, highway-env's axis-aligned top view centred on the ego car, 50 m across;
``bev``, an ego-centred, heading-up bird's-eye view (``env.bev.*``). See :mod:`av_td3.envs.views`.

``gymnasium.make("av_td3/Highway-v0", **kwargs)`` takes :class:`~av_td3.config.EnvConfig` fields as keyword
arguments, the nested ``image``, ``reward`` and ``bev`` as dicts (or config objects), e.g.
``gymnasium.make("av_td3/Highway-v0", town="racetrack", npcs=5, image={"height": 64, "width": 64})``.
A ``max_episode_steps`` given to ``gymnasium.make`` is gymnasium's own (a ``TimeLimit`` wrapper on top of
the env's ``env.max_episode_steps``, default 500); :func:`av_td3.envs.make` sets the env's own.
"""

from __future__ import annotations

import math
import os
from typing import Any

# Our frames are drawn on plain pygame surfaces and need no video driver, but highway-env's own viewer (its
# render(), e.g. for videos) opens one and then draws nothing under SDL's "dummy" driver (all-black frames).
# "offscreen" is headless and draws; set it before pygame is imported below.
if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
    os.environ["SDL_VIDEODRIVER"] = "offscreen"
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # pygame.init() would open audio
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
from highway_env.envs.highway_env import HighwayEnvFast  # noqa: E402
from highway_env.envs.racetrack_env import RacetrackEnv  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402
from highway_env.vehicle.graphics import VehicleGraphics  # noqa: E402

from av_td3.config import BevConfig, ConfigError, EnvConfig, ImageConfig, RewardConfig  # noqa: E402
from av_td3.envs import fast_road  # noqa: E402
from av_td3.envs.backends import highway_decision_dt  # noqa: E402
from av_td3.envs.base import (LEAD_PATH_SPACING_M, LEAD_PATH_STEPS, LEAD_RANGE_M, MAX_SPEED_M_S,  # noqa: E402
                              DrivingEnv, DrivingSignals, lead_vehicle, to_ego_frame, wrap_angle)
from av_td3.envs.views import BirdsEyeView, WorldView  # noqa: E402

ACCELERATION_RANGE = (-5.0, 5.0)  # m/s^2 for throttle_brake = -1 .. 1 (highway-env's default)
STEERING_RANGE = (-math.pi / 4, math.pi / 4)  # rad for steer = -1 .. 1 (agent.pid.max_steer_rad agrees)
SPEED_RANGE = (0.0, MAX_SPEED_M_S)  # braking stops the car instead of reversing it
RACETRACK_MAX_NPCS = 30  # the 2 x 360 m track holds this many with the spacing below, on every seed
NPC_GAP_M = 8.0  # spawn spacing between other vehicles
EGO_CLEARANCE_M = 20.0  # no vehicle spawns closer to the ego (highway-env's own racetrack rule)


class _Racetrack(RacetrackEnv):
    """racetrack-v0 with exactly ``config["npcs"]`` other vehicles. The stock scene spawns a random number below
    ``other_vehicles``, so that stays 0 (the stock code then places the ego alone) and the NPCs are added here
    the way the stock code does: IDM vehicles at random places on random lanes, none too close to another."""

    @classmethod
    def default_config(cls) -> dict:
        config = super().default_config()
        config.update(other_vehicles=0, npcs=0)
        return config

    def _make_vehicles(self) -> None:
        super()._make_vehicles()
        road, rng, ego = self.road, self.np_random, self.vehicle
        tries = 0
        while len(road.vehicles) <= self.config["npcs"]:
            tries += 1
            if tries > 100 * (self.config["npcs"] + 1):
                raise RuntimeError(f"could not place {self.config['npcs']} vehicles on the racetrack")
            index = road.network.random_lane_index(rng)
            lane = road.network.get_lane(index)
            npc = IDMVehicle.make_on_lane(road, index, longitudinal=rng.uniform(0, lane.length),
                                          speed=6.0 + rng.uniform(high=3.0))
            if all(np.linalg.norm(npc.position - v.position) >= (EGO_CLEARANCE_M if v is ego else NPC_GAP_M)
                   for v in road.vehicles):
                npc.check_collisions = False  # as highway-fast does: only the ego's collisions are checked
                road.vehicles.append(npc)


_SCENES: dict[str, type] = {"racetrack": _Racetrack, "highway": HighwayEnvFast}
_NPC_KEY = {"racetrack": "npcs", "highway": "vehicles_count"}


class HighwayDrivingEnv(DrivingEnv):
    """One highway-env scene (``env.town``) with ``env.npcs`` other vehicles, as a :class:`DrivingEnv`.
    ``seed`` seeds the simulator's random stream, which unseeded ``reset()`` calls then continue."""

    def __init__(self, cfg: EnvConfig, seed: int | None = None, vectorised_road: bool = True) -> None:
        """``vectorised_road=False`` keeps highway-env's own per-vehicle road queries (for comparisons; the
        results are the same, see :mod:`av_td3.envs.fast_road`)."""
        if cfg.town not in _SCENES:
            raise ConfigError(f"env.town={cfg.town!r} is not a scene of the embedded simulator: choose one of "
                              f"{', '.join(_SCENES)} (e.g. `env.town=racetrack`).")
        if cfg.town == "racetrack" and cfg.npcs > RACETRACK_MAX_NPCS:
            raise ConfigError(f"env.npcs={cfg.npcs} is more vehicles than the racetrack holds: use env.npcs <= "
                              f"{RACETRACK_MAX_NPCS}, or env.town=highway.")
        if cfg.simulation_frequency < cfg.policy_frequency:
            raise ConfigError(f"env.policy_frequency={cfg.policy_frequency} exceeds env.simulation_frequency="
                              f"{cfg.simulation_frequency}: the policy cannot act more often than the simulator steps.")
        super().__init__(cfg.image.height, cfg.image.width, cfg.image.stack, cfg.lane_points, cfg.max_episode_steps,
                         cfg.reward, dt=highway_decision_dt(cfg))
        self.cfg = cfg
        self.vectorised_road = vectorised_road
        self.sim = _SCENES[cfg.town](config={
            # We draw the frame ourselves: ask highway-env for its cheapest observation (an empty dict).
            "observation": {"type": "AttributesObservation", "attributes": []},
            "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True,
                       "acceleration_range": ACCELERATION_RANGE, "steering_range": STEERING_RANGE,
                       "speed_range": SPEED_RANGE},
            _NPC_KEY[cfg.town]: cfg.npcs,
            "simulation_frequency": cfg.simulation_frequency,
            "policy_frequency": cfg.policy_frequency,
            "duration": math.inf,  # DrivingEnv truncates at env.max_episode_steps
        })
        if seed is not None:
            self.sim.reset(seed=seed)  # highway-env seeds its random stream on reset only
        h, w = cfg.image.height, cfg.image.width
        self.view: WorldView | BirdsEyeView = BirdsEyeView(h, w, cfg.bev) if cfg.view == "bev" else WorldView(h, w)
        self._prev_position = np.zeros(2)
        self._prev_band = 0

    # --- DrivingEnv hooks ----------------------------------------------------------------------------------
    def _sim_reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        self.sim.reset(seed=seed)
        if self.vectorised_road:  # each reset builds a new road: the same results, much faster with many NPCs
            fast_road.speed_up(self.sim.road)
        self.view.reset()  # a new road object: draw it afresh
        self.sim.vehicle.color = VehicleGraphics.EGO_COLOR  # else drawn yellow: the same gray as the blue NPCs
        return self._observe(reset=True)

    def _sim_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        # ContinuousAction takes [acceleration, steering] with steering positive to the right: flip it.
        self.sim.step(np.array([action[1], -action[0]], dtype=np.float64))
        return self._observe()

    def close(self) -> None:
        self.sim.close()

    # --- measurements --------------------------------------------------------------------------------------
    def _observe(self, reset: bool = False) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        ego, lane = self.sim.vehicle, self.sim.vehicle.lane
        s, lateral = lane.local_coordinates(ego.position)
        lane_heading, width = lane.heading_at(s), lane.width_at(s)
        # highway-env's lateral offset and angles are positive to the driver's right (its y axis points down).
        offset, heading_error = -float(lateral), -wrap_angle(float(ego.heading - lane_heading))
        # The lane the ego is in by lateral position across the road (-1 and n: beyond its edges); a change is a
        # crossed marking. Lane ids run across the road from one edge and carry on along it, on both scenes.
        band = math.floor(ego.lane_index[2] + lateral / width + 0.5)
        if reset:
            self._prev_position, self._prev_band = ego.position.copy(), band
        # Progress: the step's displacement along the lane direction, so changing road segments needs no care.
        progress = float(np.dot(ego.position - self._prev_position, [math.cos(lane_heading), math.sin(lane_heading)]))
        signals = DrivingSignals(
            speed=float(ego.speed),
            speed_along_lane=float(ego.speed) * math.cos(heading_error),
            lateral_offset=offset,
            lane_half_width=float(width) / 2,
            heading_error=heading_error,
            collision=bool(ego.crashed),
            off_road=not ego.on_road,
            lane_invasion=band != self._prev_band,
            progress=progress,
        )
        self._prev_position, self._prev_band = ego.position.copy(), band
        flip = np.array([1.0, -1.0])  # highway-env's world (y down) -> a right-handed one (y up)
        points = to_ego_frame(self._lane_points(s, self.cfg.lane_points, self.cfg.lane_point_spacing) * flip,
                              ego.position * flip, -ego.heading)
        gap, closing = self._lead(s, signals)
        state = np.concatenate([[signals.speed, offset, heading_error, gap, closing], points.ravel()])
        return self.view.render(self.sim.road, ego), state.astype(np.float32), signals

    def _lead(self, s: float, signals: DrivingSignals) -> tuple[float, float]:
        """Gap and closing speed to the vehicle ahead in the ego's lane (highway-env's world frame throughout)."""
        if not self.cfg.lead_vehicle:  # the ablation: nobody ahead, and no lookup
            return LEAD_RANGE_M, 0.0
        ego = self.sim.vehicle
        others = [v for v in self.sim.road.vehicles if v is not ego]
        if not others:
            return LEAD_RANGE_M, 0.0
        path = np.vstack([ego.lane.position(s, 0), self._lane_points(s, LEAD_PATH_STEPS, LEAD_PATH_SPACING_M)])
        return lead_vehicle(path, signals.lane_half_width, signals.speed_along_lane,
                            np.array([v.position for v in others]), np.array([v.velocity for v in others]))

    def _lane_points(self, s: float, count: int, spacing: float) -> np.ndarray:
        """World positions of ``count`` lane-centre points ``spacing`` apart ahead of longitudinal ``s`` on the
        ego's lane, continuing onto the next lane of the road where a segment ends."""
        network = self.sim.road.network
        index, lane = self.sim.vehicle.lane_index, self.sim.vehicle.lane
        points = []
        for k in range(1, count + 1):
            target = s + k * spacing
            while target > lane.length:
                following = network.next_lane(index, position=lane.position(lane.length, 0))
                if following == index:  # the road ends: extend the last lane
                    break
                target, s = target - lane.length, s - lane.length
                index, lane = following, network.get_lane(following)
            points.append(lane.position(target, 0))
        return np.array(points)


def from_kwargs(**kwargs: Any) -> HighwayDrivingEnv:
    """gymnasium entry point: ``EnvConfig`` fields as keyword arguments (``image``/``reward`` as dicts)."""
    for key, schema in (("image", ImageConfig), ("reward", RewardConfig), ("bev", BevConfig)):
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = schema(**kwargs[key])
    return HighwayDrivingEnv(EnvConfig(**kwargs))
