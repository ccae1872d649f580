"""The driving env on one CARLA 0.9.16 server (``env.host:env.port``), in synchronous mode.

Each ``step`` applies the control and ticks the world once, so a step is ``env.fixed_delta_s`` simulated seconds
whatever the server's speed. At start the env takes the server over: it loads ``env.town`` afresh (or, with
``env.load_world=false``, destroys every vehicle and sensor on the loaded town), forces synchronous mode, the
fixed delta and rendering, and spawns the ego with its sensors. At every reset the NPCs are destroyed and spawned
again from the episode's seed (:mod:`.traffic`), so a seed gives the same start, route, NPC spawn points and
blueprints every time. The camera frame and the events of a step are those stamped with that tick's frame
(:mod:`.sensors`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs.base import (LEAD_PATH_SPACING_M, LEAD_PATH_STEPS, LEAD_RANGE_M, REWARD_COMPONENTS, DrivingEnv,
                              DrivingSignals, EnvUnavailableError, SimulatorLostError, lead_vehicle, to_ego_frame,
                              wrap_angle)
from av_td3.envs.carla.ports import claim_port, release_port
from av_td3.envs.carla.route import build_route, heading, xy
from av_td3.envs.carla.rules import EpisodeRules
from av_td3.envs.carla.sensors import SensorInbox
from av_td3.envs.carla.traffic import check_types, npc_blueprints, spawn_npcs

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
# Episode starts are picked away from other vehicles, and NPCs away from the ego's start: a car spawned onto
# another would end the episode at once.
FREE_RADIUS_M = 10.0


def _is_unreachable(err: Exception) -> bool:
    """The client's own words when the server does not answer (or its host name does not resolve)."""
    text = str(err)
    return "time-out" in text or "resolve" in text


class CarlaSession(DrivingEnv):
    """The driving env on a CARLA 0.9.16 server, in this process (the trainer runs it in a worker process, see
    :mod:`.worker`). ``carla_module`` and ``sleep`` exist for tests (a test double of the client and a fake clock
    for the reconnect back-off); leave them out to use the real ``carla`` package."""

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
        check_types(list(cfg.npc_types))  # before connecting: a typo fails at once
        self._weather = self._weather_preset(cfg.weather)
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
        self._on_tick_id: int | None = None
        self._npc_ids: list[int] = []
        self._inbox = SensorInbox()
        self._rules = EpisodeRules(cfg, cfg.fixed_delta_s)
        self._broken_rule = ""  # the episode rule the last step broke
        self._in_junction = False  # the ego's lane position at the last observation
        self._light: Any = None  # the traffic light that governs the ego (see _check_rules)
        self._frame = -1  # frame of the last tick
        self._first_frame = True  # the next tick is the first of a new scene: it gets first_frame_timeout_s
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
        """Take the server over (at start and after a reconnect): a clean town, our world settings and weather,
        the Traffic Manager, the ego and its sensors. NPCs come at reset."""
        c = self.cfg
        world = self._client.get_world()
        if self._original_settings is None:  # not after a reconnect: the server holds our settings by then
            self._original_settings = world.get_settings()
            if self._original_settings.synchronous_mode:
                log.warning("the CARLA server at %s:%d is already in synchronous mode: another client may be "
                            "driving it, or a run was killed before it could restore the settings. It is left "
                            "asynchronous at the end.", c.host, c.port)
                # Never hand back a synchronous server: it would wait for a tick nobody sends.
                self._original_settings.synchronous_mode = False
        settings = world.get_settings()
        if settings.synchronous_mode:  # a killed run's, or ours before a reconnect
            # Asynchronous while the town is loaded or cleared, so that nothing in it waits for our ticks.
            settings.synchronous_mode = False
            world.apply_settings(settings)
        world = self._clean_world(world)
        self._world, self._map = world, world.get_map()  # from here on close() restores the settings
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = c.fixed_delta_s
        settings.no_rendering_mode = False  # the camera renders nothing otherwise
        world.apply_settings(settings)
        world.set_weather(self._weather)
        tm = self._client.get_trafficmanager(c.tm_port)
        tm.set_synchronous_mode(True)  # else the TM drives the NPCs on its own clock, not our ticks
        self._tm = tm
        self._spawn_points = self._map.get_spawn_points()
        self._library = world.get_blueprint_library()
        self._npc_blueprints = npc_blueprints(self._library, list(c.npc_types))
        self._spawn_ego()
        self._first_frame = True
        self._tick()  # the new actors exist from the next frame on

    def _clean_world(self, world: Any) -> Any:
        """Load env.town afresh, or (env.load_world=false, town already loaded) destroy every vehicle and sensor
        on it: a killed run's parked cars and cameras must not stay in the lanes or on the GPU."""
        c = self.cfg
        if c.load_world or world.get_map().name.rsplit("/", 1)[-1] != c.town:
            return self._load_town(c.town)
        strays = [a.id for a in world.get_actors() if a.type_id.startswith(("vehicle.", "sensor."))]
        if strays:
            log.warning("destroying %d vehicles and sensors left on the CARLA server at %s:%d (env.load_world="
                        "false).", len(strays), c.host, c.port)
            self._client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in strays], False)
        return world

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

    def _spawn_ego(self) -> None:
        """The ego at a free spawn point (``try_spawn_actor`` down the start candidates), then its camera,
        collision and lane-invasion sensors and our on-tick callback, all feeding a fresh inbox."""
        carla, c, world, library = self.carla, self.cfg, self._world, self._library
        ego_bp = library.find(EGO_BLUEPRINT)
        ego_bp.set_attribute("role_name", "hero")
        for point in self._start_candidates():
            self._ego = world.try_spawn_actor(ego_bp, point)
            if self._ego is not None:
                break
        else:
            where = (f"spawn point env.route.start_index={c.route.start_index}" if c.route.start_index >= 0
                     else f"any of the {len(self._spawn_points)} spawn points")
            raise RuntimeError(f"the ego cannot be spawned at {where} of {c.town}: another client's vehicles "
                               "occupy it. Stop the other client, or pick another start (env.route.start_index).")
        camera_bp = library.find("sensor.camera.rgb")
        camera_bp.set_attribute("image_size_x", str(c.camera.width))
        camera_bp.set_attribute("image_size_y", str(c.camera.height))
        camera_bp.set_attribute("fov", str(c.camera.fov))
        # camera.y is given in our frame (y left); CARLA's y points right.
        mount = carla.Transform(carla.Location(x=float(c.camera.x), y=-float(c.camera.y), z=float(c.camera.z)),
                                carla.Rotation(pitch=float(c.camera.pitch)))
        self._inbox = inbox = SensorInbox()  # callbacks of an earlier connection's sensors go to the old one
        for blueprint, transform, callback in ((camera_bp, mount, inbox.image),
                                               (library.find("sensor.other.collision"), carla.Transform(),
                                                inbox.collision),
                                               (library.find("sensor.other.lane_invasion"), carla.Transform(),
                                                inbox.lane_invasion)):
            sensor = world.spawn_actor(blueprint, transform, attach_to=self._ego)
            self._sensors.append(sensor)
            sensor.listen(callback)
        # Registered after the sensors: if the client runs on-tick callbacks in the order they were registered
        # (not verified on a real server), it runs after the client-side lane-invasion sensor's.
        self._on_tick_id = world.on_tick(inbox.on_tick)

    def _start_candidates(self) -> list[Any]:
        """env.route.start_index's spawn point, or all of them in a seeded order, those away from vehicles that
        are not ours (another client's) first."""
        points, index = self._spawn_points, self.cfg.route.start_index
        if index >= 0:
            if index >= len(points):
                raise ConfigError(f"env.route.start_index={index} but {self.cfg.town} has {len(points)} spawn "
                                  f"points: use 0..{len(points) - 1}, or -1 for a seeded random one.")
            return [points[index]]
        ours = set(self._npc_ids) | ({self._ego.id} if self._ego is not None else set())
        others = [a.get_location() for a in self._world.get_actors().filter("vehicle.*") if a.id not in ours]
        free, taken = [], []
        for i in self._rng.permutation(len(points)):
            point = points[int(i)]
            (free if all(point.location.distance(car) > FREE_RADIUS_M for car in others) else taken).append(point)
        return free + taken

    # --- simulation ---------------------------------------------------------------------------------------------
    def _tick(self) -> Any:
        """Advance the world one frame; return the camera image of exactly that frame, once the frame's
        callbacks have arrived (the first frame of a new scene gets env.first_frame_timeout_s)."""
        c = self.cfg
        timeout = max(c.timeout_s, c.first_frame_timeout_s) if self._first_frame else c.timeout_s
        frame = int(self._world.tick(timeout))
        image = self._inbox.wait(frame, timeout, c.event_wait_s)
        self._first_frame = False
        self._frame = frame
        return image

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
        """Signals and state of the last tick: the ego's transform and velocity are the client's snapshot of it,
        the events those stamped with frames up to it."""
        c = self.cfg
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        p, yaw, v = xy(transform.location), heading(transform.rotation), np.array([velocity.x, -velocity.y])
        s, lateral, lane_heading, half_width = self._route.project(p)
        progress = 0.0 if self._prev_s is None else s - self._prev_s
        self._prev_s = s
        self._route_done = s >= self._goal_s
        on_lane = self._map.get_waypoint(transform.location, project_to_road=False,
                                         lane_type=self.carla.LaneType.Driving)
        self._in_junction = on_lane is not None and bool(on_lane.is_junction)
        signals = DrivingSignals(
            speed=float(v @ [math.cos(yaw), math.sin(yaw)]),
            speed_along_lane=float(v @ [math.cos(lane_heading), math.sin(lane_heading)]),
            lateral_offset=lateral, lane_half_width=half_width,
            heading_error=wrap_angle(yaw - lane_heading),
            collision=self._inbox.take("collision", self._frame) > 0, off_road=on_lane is None,
            lane_invasion=self._inbox.take("lane_invasion", self._frame) > 0, progress=progress)
        points = to_ego_frame(self._route.points_ahead(s, c.lane_points, c.lane_point_spacing), p, yaw)
        gap, closing = self._lead(s, signals)
        state = np.concatenate([[signals.speed, signals.lateral_offset, signals.heading_error, gap, closing],
                                points.ravel()])
        return self._gray(image), state.astype(np.float32), signals

    def _lead(self, s: float, signals: DrivingSignals) -> tuple[float, float]:
        """Gap and closing speed to our NPC ahead on the route's lane. Transforms and velocities are the client's
        copies from the last tick, so this asks the server nothing."""
        if not self.cfg.lead_vehicle:  # the ablation: nobody ahead, and no lookup
            return LEAD_RANGE_M, 0.0
        npcs = list(self._world.get_actors(list(self._npc_ids))) if self._npc_ids else []
        if not npcs:
            return LEAD_RANGE_M, 0.0
        path = self._route.points_at(s + LEAD_PATH_SPACING_M * np.arange(LEAD_PATH_STEPS + 1))
        velocities = [a.get_velocity() for a in npcs]
        return lead_vehicle(path, signals.lane_half_width, signals.speed_along_lane,
                            np.array([xy(a.get_transform().location) for a in npcs]),
                            np.array([[v.x, -v.y] for v in velocities]))

    def _sim_reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        state = self._rng.bit_generator.state  # a retry after a reconnect replays the same draws
        while True:
            try:
                out = self._reset_once()
                break
            except RuntimeError as err:
                if not _is_unreachable(err):
                    raise
                self._recover(err)
                self._rng.bit_generator.state = state
        self._failures = 0
        self._last = out
        return out

    def _reset_once(self) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        """Destroy the NPCs, move the ego to its new start, spawn the NPCs again from the seeded generator, and
        wait until the cars have landed. Every draw comes from ``self._rng``, so the seed decides them all."""
        carla, c = self.carla, self.cfg
        tm_seed = int(self._rng.integers(2 ** 31))
        start = self._start_candidates()[0]  # before the NPCs go: they are ours, so they never block a start
        self._destroy(self._npc_ids)
        self._npc_ids = []
        self._route = build_route(self._map, start, c.route.length_m + c.lane_points * c.lane_point_spacing,
                                  c.route.spacing_m, self._rng)
        self._goal_s = min(c.route.length_m, float(self._route.s[-1]))
        self._ego.set_transform(start)
        self._ego.set_target_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.set_target_angular_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.apply_control(carla.VehicleControl(throttle=0.0, steer=0.0, brake=1.0))
        # Before the NPCs are registered with it: the TM seeds each vehicle's generator at registration.
        self._tm.set_random_device_seed(tm_seed)
        free = [p for p in self._spawn_points if p.location.distance(start.location) > FREE_RADIUS_M]
        self._npc_ids = spawn_npcs(self._client, carla.command, self._npc_blueprints, free, c.npcs, c.tm_port,
                                   self._rng)
        for _ in range(max(1, math.ceil(SETTLE_S / c.fixed_delta_s))):
            image = self._tick()
        # The teleport, the spawns and the landing are not the agent's doing.
        self._inbox.take("collision", self._frame)
        self._inbox.take("lane_invasion", self._frame)
        self._prev_s = None
        self._lost_step = False
        self._rules.reset()
        self._light = None
        return self._observe(image)

    def _sim_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        steer, throttle_brake = float(action[0]), float(action[1])
        try:
            # our steer > 0 turns left; CARLA's (left-handed world, y to the right) turns right: negate it
            self._ego.apply_control(self.carla.VehicleControl(
                throttle=max(throttle_brake, 0.0), steer=-steer, brake=max(-throttle_brake, 0.0)))
            out = self._observe(self._tick())
            self._broken_rule = self._check_rules(out[2])
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

    def _check_rules(self, signals: DrivingSignals) -> str:
        """The episode rule (:mod:`.rules`) this step broke, or "". The traffic lights are read from the client's
        snapshot of the last tick."""
        light = self._ego.get_traffic_light()  # the light whose trigger area the ego is in, or None
        if light is not None:
            self._light = light  # it governs the ego until the ego enters the junction
        light_red = self._light is not None and self._light.get_state() == self.carla.TrafficLightState.Red
        broken = self._rules.check(signals, light_red, self._in_junction)
        if self._in_junction:
            self._light = None
        return broken

    def _recover(self, err: Exception) -> None:
        """Reconnect with exponential back-off and take the server over again; SimulatorLostError after
        env.max_reconnects failed attempts in a row. This rides out a stalled server; a restarted one has left
        this process's Traffic Manager bound to the dead one, and the CARLA client aborts the process: the worker
        (:mod:`.worker`) then starts a fresh one."""
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
            # The old sensors belong to the old connection and are not stopped (that would wait for it); the
            # take-over destroys every vehicle and sensor on the server, ours included.
            self._sensors, self._ego, self._npc_ids, self._on_tick_id = [], None, [], None
            try:
                self._connect()
                self._build()
            except RuntimeError as again:
                if not _is_unreachable(again):
                    raise
                err = again
                continue
            self.reconnects += 1
            return

    def _destroy(self, ids: list[int]) -> None:
        if ids:
            self._client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in ids], False)

    # --- gymnasium API ------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self._last_obs = obs
        info["reconnects"] = self.reconnects
        return obs, info

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self._broken_rule = ""
        obs, reward, terminated, truncated, info = super().step(action)
        if self._broken_rule and not self._lost_step:
            terminated, truncated = True, False
        info["termination"] = ("collision" if info["collision"] else "off_road" if info["off_road"]
                               else self._broken_rule) if terminated else ""
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
        """Stop our sensors and on-tick callback (so no callback outlives them), destroy sensors, ego and NPCs in
        one batch, and give the server back its original settings, asynchronous. Safe to call twice and after the
        server is gone (then it only warns)."""
        if self._client is not None:
            try:
                for sensor in self._sensors:
                    sensor.stop()
                if self._on_tick_id is not None and self._world is not None:
                    self._world.remove_on_tick(self._on_tick_id)
                ids = [s.id for s in self._sensors] + ([self._ego.id] if self._ego is not None else []) + self._npc_ids
                self._sensors, self._ego, self._npc_ids, self._on_tick_id = [], None, [], None
                self._destroy(ids)
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
