"""CARLA 0.9.16 backend of the driving-env contract in :mod:`av_td3.envs.base`.

One env drives one CARLA server (``env.host:env.port``) in synchronous mode: each ``step`` applies the control and
ticks the world once, so a step is ``env.fixed_delta_s`` simulated seconds whatever the server's speed. The ego
follows a route built from the map's own waypoints; the camera frame of each step is the one stamped with that
tick's frame id. CARLA's world is left-handed (y right, yaw clockwise seen from above); everything handed to the
agent is converted to the contract's right-handed ego frame (x forward, y left).

The ``carla`` package is imported when an env is built, never at ``import av_td3`` time, so the embedded
simulator works without the CARLA client installed.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs.base import (LEAD_PATH_SPACING_M, LEAD_PATH_STEPS, LEAD_RANGE_M, REWARD_COMPONENTS, DrivingEnv,
                              DrivingSignals, EnvUnavailableError, SimulatorLostError, lead_vehicle, to_ego_frame,
                              wrap_angle)

log = logging.getLogger(__name__)

START_SERVER = "docker compose -f docker/compose.yaml up -d carla"
EGO_BLUEPRINT = "vehicle.tesla.model3"
# Spawn points sit a little above the road: the car is held still this long after a reset so it has landed (and
# the bump of landing is not counted as a collision) before the agent acts.
SETTLE_S = 0.5
# Loading a town takes far longer than any other call; env.timeout_s is meant for those.
LOAD_WORLD_TIMEOUT_S = 60.0
# Reconnect back-off: 1 s, 2 s, 4 s, ... capped so a long outage keeps probing.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# A random episode start is picked away from NPCs: teleporting onto a car would end the episode at once.
FREE_RADIUS_M = 10.0


def _is_unreachable(err: Exception) -> bool:
    """The client's own words when the server does not answer (or its host name does not resolve)."""
    text = str(err)
    return "time-out" in text or "resolve" in text


def _xy(location: Any) -> np.ndarray:
    """CARLA location → our right-handed world frame (y flipped)."""
    return np.array([location.x, -location.y])


def _heading(rotation: Any) -> float:
    """CARLA yaw (degrees, clockwise seen from above) → heading in radians, counter-clockwise."""
    return -math.radians(rotation.yaw)


# ------------------------------------------------------------------------------------------------- port claims
def _claim_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"av_td3_carla_{re.sub(r'[^A-Za-z0-9.-]', '_', name)}.lock"


def claim_port(key: str, label: str) -> Path:
    """Record that this process drives ``key`` (a CARLA server, or a Traffic Manager port); warn when another
    live process of ours already does, because two trainers on one synchronous server tick each other's world and
    drive each other's cars. Returns the claim file, to release with :func:`release_port`."""
    path = _claim_path(key)
    try:
        holder = int(path.read_text().strip())
    except (OSError, ValueError):
        holder = None
    if holder is not None and psutil.pid_exists(holder):
        log.warning("%s is already in use by av-td3 process %d: give each parallel job its own CARLA server "
                    "(env.port) and Traffic Manager port (env.tm_port), see README 'Train in CARLA'.", label, holder)
    path.write_text(str(os.getpid()))
    return path


def release_port(path: Path) -> None:
    """Remove a claim made by this process (a claim since taken over by another process is left alone)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------------ route
class Route:
    """Lane-centre polyline in our right-handed world frame, with its arc length."""

    def __init__(self, xy: np.ndarray, half_width: np.ndarray) -> None:
        self.xy = np.asarray(xy, dtype=np.float64)
        self.half_width = np.asarray(half_width, dtype=np.float64)
        self.seg = np.diff(self.xy, axis=0)
        self.seg_len = np.maximum(np.hypot(self.seg[:, 0], self.seg[:, 1]), 1e-6)
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.heading = np.arctan2(self.seg[:, 1], self.seg[:, 0])
        self._last = 0  # segment the car was last on

    def project(self, p: np.ndarray) -> tuple[float, float, float, float]:
        """(arc length, lateral offset (left of the centre > 0), lane heading, lane half width) at point ``p``.

        Only segments near the last one are searched: a route that passes the same place twice (a loop, a
        bridge) must not make the car jump along it."""
        lo, hi = max(self._last - 2, 0), min(self._last + 30, len(self.seg))
        a, d, length = self.xy[lo:hi], self.seg[lo:hi], self.seg_len[lo:hi]
        t = np.clip(((p - a) * d).sum(axis=1) / length ** 2, 0.0, 1.0)
        k = int(np.argmin(np.hypot(*(a + t[:, None] * d - p).T)))
        i = lo + k
        self._last = i
        lateral = (d[k, 0] * (p[1] - a[k, 1]) - d[k, 1] * (p[0] - a[k, 0])) / length[k]
        return float(self.s[i] + t[k] * length[k]), float(lateral), float(self.heading[i]), float(self.half_width[i])

    def points_ahead(self, s: float, n: int, spacing: float) -> np.ndarray:
        """The ``n`` lane-centre points ``spacing``, 2 * ``spacing``, ... metres further along the route."""
        return self.points_at(s + spacing * np.arange(1, n + 1))

    def points_at(self, ss: np.ndarray) -> np.ndarray:
        """Lane-centre points at arc lengths ``ss`` (held at the route's ends beyond them)."""
        return np.stack([np.interp(ss, self.s, self.xy[:, 0]), np.interp(ss, self.s, self.xy[:, 1])], axis=1)


# -------------------------------------------------------------------------------------------------------- env
class CarlaDrivingEnv(DrivingEnv):
    """The driving env on a CARLA 0.9.16 server. ``carla_module`` and ``sleep`` exist for tests (a test double of
    the client and a fake clock); leave them out to use the real ``carla`` package."""

    def __init__(self, cfg: EnvConfig, seed: int | None = None, *, carla_module: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if carla_module is None:
            try:
                import carla as carla_module
            except ImportError:
                raise EnvUnavailableError("env=carla needs the CARLA client: pip install '.[carla]'") from None
        super().__init__(cfg.image.height, cfg.image.width, cfg.image.stack, cfg.lane_points,
                         cfg.max_episode_steps, cfg.reward, dt=cfg.fixed_delta_s)
        self.carla = carla_module
        self.cfg = cfg
        self.reconnects = 0  # successful reconnects over the env's life (info["reconnects"])
        self._sleep = sleep
        self._rng = np.random.default_rng(seed)
        self._tm_seed = seed if seed is not None else int(self._rng.integers(2 ** 31))
        self._weather = self._weather_preset(cfg.weather)  # before connecting: a typo fails at once
        self._warn_ignored(cfg)
        self._failures = 0  # time-outs since the last good tick
        self._lost_step = False
        self._route_done = False
        self._client: Any = None
        self._world: Any = None
        self._map: Any = None
        self._tm: Any = None
        self._original_settings: Any = None
        self._ego: Any = None
        self._sensors: list[Any] = []
        self._npc_ids: list[int] = []
        self._claims = [claim_port(f"{cfg.host}_{cfg.port}", f"CARLA server {cfg.host}:{cfg.port}"),
                        claim_port(f"tm_{cfg.tm_port}", f"Traffic Manager port {cfg.tm_port}")]
        try:
            self._connect()
            self._build()
        except BaseException as err:
            self.close()
            if isinstance(err, RuntimeError) and _is_unreachable(err):
                raise EnvUnavailableError(
                    f"cannot reach the CARLA server at {cfg.host}:{cfg.port} ({err}). Start one with "
                    f"`{START_SERVER}` (or ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={cfg.port}), wait until "
                    "it listens, or point env.host/env.port at a running server.") from None
            raise

    # --- config ----------------------------------------------------------------------------------------------
    def _weather_preset(self, name: str) -> Any:
        params = self.carla.WeatherParameters
        preset = getattr(params, name, None)
        if not isinstance(preset, params):
            names = sorted(n for n in dir(params) if isinstance(getattr(params, n), params))
            raise ConfigError(f"env.weather={name!r} is not a CARLA weather preset: choose one of {', '.join(names)}.")
        return preset

    @staticmethod
    def _warn_ignored(cfg: EnvConfig) -> None:
        defaults = EnvConfig()
        for key in ("simulation_frequency", "policy_frequency"):
            if getattr(cfg, key) != getattr(defaults, key):
                log.warning("env.%s is ignored by env=carla: one step is one tick of env.fixed_delta_s=%g s.",
                            key, cfg.fixed_delta_s)

    # --- connection and world set-up --------------------------------------------------------------------------
    def _connect(self) -> None:
        c = self.cfg
        client = self.carla.Client(c.host, c.port)
        client.set_timeout(c.timeout_s)
        server = client.get_server_version()  # the first call that needs the server: fails after timeout_s
        if server != client.get_client_version():
            log.warning("CARLA server %s at %s:%d differs from the client %s: use the carlasim/carla:0.9.16 image.",
                        server, c.host, c.port, client.get_client_version())
        self._client = client

    def _build(self) -> None:
        """Put the server in the state an episode needs: town, synchronous settings, weather, Traffic Manager,
        then the ego, its sensors and the NPCs."""
        c = self.cfg
        world = self._client.get_world()
        if self._original_settings is None:  # not after a reconnect: the server may hold our settings by then
            self._original_settings = world.get_settings()
            if self._original_settings.synchronous_mode:
                log.warning("the CARLA server at %s:%d is already in synchronous mode: another client may be "
                            "driving it, or a run was killed before it could restore the settings.", c.host, c.port)
        town_map = world.get_map()  # an expensive call: fetched once per world
        if town_map.name.rsplit("/", 1)[-1] != c.town:
            world = self._load_town(c.town)
            town_map = world.get_map()
        self._world, self._map = world, town_map  # from here on close() restores the settings
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = c.fixed_delta_s
        world.apply_settings(settings)
        world.set_weather(self._weather)
        tm = self._client.get_trafficmanager(c.tm_port)
        tm.set_synchronous_mode(True)  # else the TM drives the NPCs on its own clock, not our ticks
        tm.set_random_device_seed(self._tm_seed)
        self._tm = tm
        self._spawn_points = town_map.get_spawn_points()
        self._spawn_actors()

    def _load_town(self, town: str) -> Any:
        available = sorted(m.rsplit("/", 1)[-1] for m in self._client.get_available_maps())
        if town not in available:
            raise ConfigError(f"env.town={town!r} is not a map of the CARLA server at {self.cfg.host}:"
                              f"{self.cfg.port}: choose one of {', '.join(available)}.")
        self._client.set_timeout(max(self.cfg.timeout_s, LOAD_WORLD_TIMEOUT_S))
        try:
            return self._client.load_world(town)
        finally:
            self._client.set_timeout(self.cfg.timeout_s)

    def _spawn_actors(self) -> None:
        carla, c, world = self.carla, self.cfg, self._world
        library = world.get_blueprint_library()
        start = self._pick_start()
        ego_bp = library.find(EGO_BLUEPRINT)
        ego_bp.set_attribute("role_name", "hero")
        self._ego = world.spawn_actor(ego_bp, start)

        camera_bp = library.find("sensor.camera.rgb")
        camera_bp.set_attribute("image_size_x", str(c.camera.width))
        camera_bp.set_attribute("image_size_y", str(c.camera.height))
        camera_bp.set_attribute("fov", str(c.camera.fov))
        # camera.y is given in our frame (y left); CARLA's y points right.
        mount = carla.Transform(carla.Location(x=c.camera.x, y=-c.camera.y, z=c.camera.z),
                                carla.Rotation(pitch=c.camera.pitch))
        self._images: queue.Queue = queue.Queue()
        self._collisions: queue.Queue = queue.Queue()
        self._invasions: queue.Queue = queue.Queue()
        for blueprint, transform, sink in ((camera_bp, mount, self._images),
                                           (library.find("sensor.other.collision"), carla.Transform(),
                                            self._collisions),
                                           (library.find("sensor.other.lane_invasion"), carla.Transform(),
                                            self._invasions)):
            sensor = world.spawn_actor(blueprint, transform, attach_to=self._ego)
            self._sensors.append(sensor)
            sensor.listen(sink.put)  # CARLA calls back on its own threads; a queue hands the data over safely
        self._spawn_npcs(library, start)
        self._tick()  # the new actors exist from the next frame on

    def _spawn_npcs(self, library: Any, ego_start: Any) -> None:
        c, command = self.cfg, self.carla.command
        cars = [bp for bp in library.filter("vehicle.*")
                if bp.has_attribute("number_of_wheels") and int(bp.get_attribute("number_of_wheels")) == 4]
        free = [p for p in self._spawn_points if p.location.distance(ego_start.location) > 1.0]
        order = self._rng.permutation(len(free))
        if c.npcs > len(free):
            log.warning("env.npcs=%d but %s has %d free spawn points: spawning %d.", c.npcs, c.town, len(free),
                        len(free))
        batch = []
        for i in order[:c.npcs]:
            bp = cars[int(self._rng.integers(len(cars)))]
            bp.set_attribute("role_name", "autopilot")
            batch.append(command.SpawnActor(bp, free[i]).then(
                command.SetAutopilot(command.FutureActor, True, c.tm_port)))
        responses = self._client.apply_batch_sync(batch, False) if batch else []
        self._npc_ids = [r.actor_id for r in responses if not r.has_error()]
        failed = [r.error for r in responses if r.has_error()]
        if failed:
            log.warning("%d of %d NPCs failed to spawn (first error: %s).", len(failed), len(batch), failed[0])

    def _pick_start(self) -> Any:
        points, index = self._spawn_points, self.cfg.route.start_index
        if index >= 0:
            if index >= len(points):
                raise ConfigError(f"env.route.start_index={index} but {self.cfg.town} has {len(points)} spawn "
                                  f"points: use 0..{len(points) - 1}, or -1 for a seeded random one.")
            return points[index]
        # Every other vehicle counts, not only our NPCs: a run that was killed may have left its cars behind.
        cars = [a.get_location() for a in self._world.get_actors().filter("vehicle.*")
                if self._ego is None or a.id != self._ego.id]
        order = self._rng.permutation(len(points))
        for i in order:
            if all(points[i].location.distance(car) > FREE_RADIUS_M for car in cars):
                return points[i]
        return points[order[0]]

    def _build_route(self, start: Any) -> Route:
        """Follow the map's waypoints from the start; at a junction a seeded random branch is taken. The route
        runs past ``route.length_m`` by the lane points' reach, so they exist up to the goal."""
        c = self.cfg
        waypoint = self._map.get_waypoint(start.location)
        reach = c.route.length_m + c.lane_points * c.lane_point_spacing
        xy, half = [_xy(waypoint.transform.location)], [waypoint.lane_width / 2]
        travelled = 0.0
        while travelled < reach:
            following = waypoint.next(c.route.spacing_m)
            if not following:  # a dead end: the route (and the episode's goal) stops here
                break
            waypoint = following[int(self._rng.integers(len(following)))]
            xy.append(_xy(waypoint.transform.location))
            half.append(waypoint.lane_width / 2)
            travelled += c.route.spacing_m
        if len(xy) < 2:
            raise RuntimeError(f"no road ahead of the spawn point at {start.location} in {c.town}")
        route = Route(np.array(xy), np.array(half))
        self._goal_s = min(c.route.length_m, float(route.s[-1]))
        return route

    # --- simulation ---------------------------------------------------------------------------------------------
    def _tick(self) -> Any:
        """Advance the world one frame; return the camera image of exactly that frame."""
        timeout = self.cfg.timeout_s
        frame = self._world.tick(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                image = self._images.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RuntimeError(f"time-out of {timeout:g}s waiting for the camera image of frame {frame}") from None
            if image.frame == frame:
                return image
            if image.frame > frame:  # only when some other client ticks this server too
                log.warning("camera image of frame %d arrived for tick %d: is another client ticking %s:%d?",
                            image.frame, frame, self.cfg.host, self.cfg.port)
                return image
            # else: an image of an earlier tick (one we stopped waiting for) is discarded

    def _gray(self, image: Any) -> np.ndarray:
        """BGRA camera image → uint8 grayscale of env.image size (same luma weights as the embedded env)."""
        bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
        gray = np.rint(0.299 * bgra[..., 2] + 0.587 * bgra[..., 1] + 0.114 * bgra[..., 0])
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        size = (self.cfg.image.height, self.cfg.image.width)
        if gray.shape != size:
            from PIL import Image  # installed with matplotlib; only needed when camera and image sizes differ
            gray = np.asarray(Image.fromarray(gray).resize(size[::-1], Image.Resampling.BILINEAR))
        return gray

    def _observe(self, image: Any) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        c = self.cfg
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        p, heading, v = _xy(transform.location), _heading(transform.rotation), np.array([velocity.x, -velocity.y])
        s, lateral, lane_heading, half_width = self._route.project(p)
        progress = 0.0 if self._prev_s is None else s - self._prev_s
        self._prev_s = s
        self._route_done = s >= self._goal_s
        on_lane = self._map.get_waypoint(transform.location, project_to_road=False,
                                         lane_type=self.carla.LaneType.Driving)
        signals = DrivingSignals(
            speed=float(v @ [math.cos(heading), math.sin(heading)]),
            speed_along_lane=float(v @ [math.cos(lane_heading), math.sin(lane_heading)]),
            lateral_offset=lateral, lane_half_width=half_width,
            heading_error=wrap_angle(heading - lane_heading),
            collision=self._drain(self._collisions) > 0, off_road=on_lane is None,
            lane_invasion=self._drain(self._invasions) > 0, progress=progress)
        points = to_ego_frame(self._route.points_ahead(s, c.lane_points, c.lane_point_spacing), p, heading)
        gap, closing = self._lead(s, signals)
        state = np.concatenate([[signals.speed, signals.lateral_offset, signals.heading_error, gap, closing],
                                points.ravel()])
        return self._gray(image), state.astype(np.float32), signals

    def _lead(self, s: float, signals: DrivingSignals) -> tuple[float, float]:
        """Gap and closing speed to our NPC ahead on the route's lane. Transforms and velocities are the client's
        copies from the last tick, so this asks the server nothing."""
        if not self.cfg.lead_vehicle:  # the ablation: nobody ahead, and no lookup
            return LEAD_RANGE_M, 0.0
        npcs = list(self._world.get_actors(self._npc_ids)) if self._npc_ids else []
        if not npcs:
            return LEAD_RANGE_M, 0.0
        path = self._route.points_at(s + LEAD_PATH_SPACING_M * np.arange(LEAD_PATH_STEPS + 1))
        velocities = [a.get_velocity() for a in npcs]
        return lead_vehicle(path, signals.lane_half_width, signals.speed_along_lane,
                            np.array([_xy(a.get_transform().location) for a in npcs]),
                            np.array([[v.x, -v.y] for v in velocities]))

    @staticmethod
    def _drain(events: queue.Queue) -> int:
        n = 0
        while True:
            try:
                events.get_nowait()
            except queue.Empty:
                return n
            n += 1

    def _sim_reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._tm_seed = seed  # a rebuild after a reconnect seeds the new Traffic Manager with it too
        while True:
            try:
                out = self._reset_once(seed)
                break
            except RuntimeError as err:
                if not _is_unreachable(err):
                    raise
                self._recover(err)
        self._failures = 0
        self._last = out
        return out

    def _reset_once(self, seed: int | None) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        """Move the ego (not the NPCs: they keep driving) to a new start, and wait until it has landed."""
        carla = self.carla
        if seed is not None:
            self._tm.set_random_device_seed(seed)
        start = self._pick_start()
        self._route = self._build_route(start)
        self._ego.set_transform(start)
        self._ego.set_target_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.set_target_angular_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.apply_control(carla.VehicleControl(throttle=0.0, steer=0.0, brake=1.0))
        for _ in range(max(1, math.ceil(SETTLE_S / self.cfg.fixed_delta_s))):
            image = self._tick()
        self._drain(self._collisions)  # the teleport and the landing are not the agent's doing
        self._drain(self._invasions)
        self._prev_s = None
        self._lost_step = False
        return self._observe(image)

    def _sim_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        steer, throttle_brake = float(action[0]), float(action[1])
        try:
            # our steer > 0 turns left; CARLA's (left-handed world, y to the right) turns right: negate it
            self._ego.apply_control(self.carla.VehicleControl(
                throttle=max(throttle_brake, 0.0), steer=-steer, brake=max(-throttle_brake, 0.0)))
            out = self._observe(self._tick())
        except RuntimeError as err:
            if not _is_unreachable(err):
                raise
            self._recover(err)
            # Nothing happened this step: step() ends the episode as truncated with the last good observation.
            self._lost_step = True
            frame, state, signals = self._last
            return frame, state, replace(signals, collision=False, off_road=False, lane_invasion=False, progress=0.0)
        self._failures = 0
        self._last = out
        return out

    def _recover(self, err: Exception) -> None:
        """Reconnect with exponential back-off and rebuild the scene; SimulatorLostError after
        env.max_reconnects failed attempts in a row."""
        c = self.cfg
        while True:
            self._failures += 1
            if self._failures > c.max_reconnects:
                raise SimulatorLostError(
                    f"lost the CARLA server at {c.host}:{c.port} ({err}); {c.max_reconnects} reconnect attempt(s) "
                    f"failed. Bring the server back (`{START_SERVER}`) and rerun the same command: training resumes "
                    "from the last checkpoint.") from None
            delay = min(BACKOFF_S * 2 ** (self._failures - 1), MAX_BACKOFF_S)
            log.warning("CARLA at %s:%d: %s; reconnecting in %g s (attempt %d of %d).", c.host, c.port, err, delay,
                        self._failures, c.max_reconnects)
            self._sleep(delay)
            try:
                self._connect()
                self._destroy_actors(after_reconnect=True)
                self._build()
            except RuntimeError as again:
                if not _is_unreachable(again):
                    raise
                err = again
                continue
            self.reconnects += 1
            return

    def _destroy_actors(self, after_reconnect: bool = False) -> None:
        """Stop the sensors (so no callback outlives them), then destroy sensors, ego and NPCs in one batch.

        After a reconnect the old actors are destroyed only if the server still has them (it may have merely
        stalled), and only vehicles and sensors: a restarted server reuses ids for its own actors (traffic lights).
        The old sensor objects are not stopped then: they belong to the dead connection and would wait for it."""
        ids = [s.id for s in self._sensors] + ([self._ego.id] if self._ego is not None else []) + self._npc_ids
        if ids and after_reconnect:
            ids = [a.id for a in self._client.get_world().get_actors(ids)
                   if a.type_id.startswith(("vehicle.", "sensor."))]
        elif ids:
            for sensor in self._sensors:
                sensor.stop()
        self._sensors, self._ego, self._npc_ids = [], None, []
        if ids:
            self._client.apply_batch_sync([self.carla.command.DestroyActor(i) for i in ids], False)

    # --- gymnasium API ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self._last_obs = obs
        info["reconnects"] = self.reconnects
        return obs, info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        if self._lost_step:
            # The server was lost mid-step and is back: the episode ends as truncated (an interruption, not a
            # failure, so the learner bootstraps) on the last good observation, with nothing earned.
            self._lost_step = False
            obs, reward, terminated, truncated = self._last_obs, 0.0, False, True
            info["reward_components"] = dict.fromkeys(REWARD_COMPONENTS, 0.0)
        elif self._route_done and not terminated:
            truncated = True  # reached route.length_m: a good end, not a terminal state
        self._last_obs = obs
        info["reconnects"] = self.reconnects
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Stop and destroy what we spawned and give the server back its original settings. Safe to call twice
        and after the server is gone (then it only warns)."""
        if self._client is not None:
            try:
                self._destroy_actors()
                if self._world is not None and self._original_settings is not None:
                    self._world.apply_settings(self._original_settings)
                if self._tm is not None:
                    self._tm.set_synchronous_mode(False)
            except RuntimeError as err:
                log.warning("could not clean up the CARLA server at %s:%d (%s): restart it if it misbehaves.",
                            self.cfg.host, self.cfg.port, err)
            self._client = self._world = self._tm = None
        for path in self._claims:
            release_port(path)
        self._claims = []
