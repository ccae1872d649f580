"""The driving env on one CARLA 0.9.16 server (``env.carla.host:env.carla.port``), in synchronous mode.

Each ``step`` applies the control and ticks the world once, so a step is ``env.carla.fixed_delta_s`` simulated
seconds whatever the server's speed. At start the env takes the server over (:mod:`.takeover`): it loads
``env.town`` afresh (or, with ``env.carla.load_world=false``, destroys every vehicle and sensor on the loaded town),
forces synchronous mode, the fixed delta and rendering, and spawns the ego with its sensors. At every reset the
NPCs are destroyed and spawned again from the episode's seed (:mod:`.traffic`), so a seed gives the same start,
route, NPC spawn points and blueprints every time. The camera frame and the events of a step are those stamped
with that tick's frame (:mod:`.sensors`). The state vector ends with the traffic light ahead (:mod:`.lights`); the
episode rules (:mod:`.rules`) are reported to the base class in the step's signals, which decides termination and
truncation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

import numpy as np

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs.backends import CARLA
from av_td3.envs.base import (LEAD_PATH_SPACING_M, LEAD_PATH_STEPS, LEAD_RANGE_M, DrivingEnv, DrivingSignals,
                              EnvUnavailableError, SimulatorLostError, StopRequested, lead_vehicle, to_ego_frame,
                              wrap_angle)
from av_td3.envs.carla.errors import (LOST, START_SERVER, TIME_OUT, UNUSABLE, NoSensorDataError, classify, diagnose,
                                      unusable)
from av_td3.envs.carla.lights import NO_LIGHT, LightsAhead
from av_td3.envs.carla.ports import claim_port, release_port, server_key
from av_td3.envs.carla.route import build_route, heading, xy
from av_td3.envs.carla.rules import EpisodeRules
from av_td3.envs.carla.sensors import SensorInbox, to_gray
from av_td3.envs.carla.takeover import FREE_RADIUS_M, WorldTakeOver
from av_td3.envs.carla.traffic import check_types, spawn_npcs

log = logging.getLogger(__name__)

# Spawn points sit a little above the road: the car is held still this long after a reset so it has landed (and
# the bump of landing is not counted as a collision) before the agent acts.
SETTLE_S = 0.5
# A new camera's first image can come a few frames after the camera was spawned: ticks the take-over may spend.
FIRST_IMAGE_TICKS = 10
# Reconnect back-off: 1 s, 2 s, 4 s, ... capped so a long outage keeps probing.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


class Supervisor(Protocol):
    """Whoever runs the session, as the session sees it: the worker process (:mod:`.worker`) or, in one process,
    :class:`Unsupervised`."""

    def stop_pending(self) -> bool:
        """True once the run is stopping (the trainer has a stop signal pending): stop reconnecting."""
        ...

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (a reconnect back-off), or less when a stop becomes pending meanwhile."""
        ...

    def alive(self) -> None:
        """Progress report (a tick answered, a reconnect attempt begun): the trainer's watchdog kills a worker
        only when it stays silent for longer than a healthy one can (:func:`.worker.watchdog_s`)."""
        ...


class Unsupervised:
    """The session's supervisor when it runs in the caller's process: ``sleep`` waits, ``stop_pending`` says
    when to stop (never, unless given), progress goes nowhere."""

    def __init__(self, sleep: Callable[[float], Any] = time.sleep,
                 stop_pending: Callable[[], bool] = lambda: False) -> None:
        self._sleep, self._stop_pending = sleep, stop_pending

    def stop_pending(self) -> bool:
        return self._stop_pending()

    def wait(self, seconds: float) -> None:
        self._sleep(seconds)

    def alive(self) -> None:
        pass


class CarlaSession(WorldTakeOver, DrivingEnv):
    """The driving env on a CARLA 0.9.16 server, in this process (the trainer runs it in a worker process, see
    :mod:`.worker`). ``supervisor`` is the worker's link (stop pending, back-off waits, progress reports);
    ``carla_module`` and ``sleep`` exist for tests (a test double of the client and a fake clock for the reconnect
    back-off when there is no supervisor); leave them out to use the real ``carla`` package."""

    _prev_s: float | None  # the ego's position along the route at the last observation; None after a reset

    def __init__(self, cfg: EnvConfig, seed: int | None = None, *, carla_module: Any = None,
                 sleep: Callable[[float], None] = time.sleep, supervisor: Supervisor | None = None) -> None:
        if carla_module is None:
            try:
                import carla
            except ImportError:
                raise EnvUnavailableError("env=carla needs the CARLA client: pip install '.[carla]'") from None
            carla_module = carla
        super().__init__(cfg.image.height, cfg.image.width, cfg.image.stack, cfg.lane_points, cfg.max_episode_steps,
                         cfg.reward, dt=CARLA.decision_dt(cfg), rules=CARLA.rules, state_tail=len(CARLA.state_tail))
        self.carla = carla_module
        self.cfg = cfg
        self.reconnects = 0  # successful reconnects over the env's life (info["reconnects"])
        self._supervisor = supervisor or Unsupervised(sleep)
        self._rng = np.random.default_rng(seed)
        check_types(list(cfg.carla.npc_types))  # before connecting: a typo fails at once
        self._weather = self._weather_preset(cfg.carla.weather)
        self._failures = 0  # time-outs since the last good tick
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
        self._rules = EpisodeRules(cfg.carla, cfg.carla.fixed_delta_s)
        self._stop_lines: list[tuple[np.ndarray, Any]] = []  # the map's traffic-light stop lines (lights.py)
        self._lights = LightsAhead([])  # those on the episode's route
        self._in_junction = False  # the ego's lane position at the last observation
        self._lane_error: float | None = None  # its lane's direction against the route's (radians), see _observe
        self._light: Any = None  # the traffic light that governs the ego (see _check_rules)
        self._frame = -1  # frame of the last tick
        k = cfg.carla
        # Keyed on the resolved address; the Traffic Manager listens on every interface, so on its port alone.
        self._claims = [claim_port(server_key(k.host, k.port), f"CARLA server {k.host}:{k.port}"),
                        claim_port(f"tm_{k.traffic_manager_port()}",
                                   f"Traffic Manager port {k.traffic_manager_port()}")]
        try:
            self._connect()
            self._build()
        except BaseException as err:
            self.close()
            kind = classify(err)
            if kind == LOST:
                raise EnvUnavailableError(diagnose(err, k)) from None
            if kind == UNUSABLE and not isinstance(err, ConfigError):  # a ConfigError already names its key
                raise unusable(err, k) from None
            raise

    # --- simulation ---------------------------------------------------------------------------------------------
    def _tick(self) -> Any:
        """Advance the world one frame; return the camera image of exactly that frame, once the frame's
        callbacks have arrived (the first frames of a new scene: :meth:`_first_images`)."""
        c = self.cfg
        frame = int(self._world.tick(c.carla.timeout_s))
        self._supervisor.alive()
        image = self._inbox.wait(frame, c.carla.timeout_s, c.carla.event_wait_s)
        self._frame = frame
        return image

    def _first_images(self) -> None:
        """Tick a new scene until its camera's images flow: a camera's first image may come some frames after it
        was spawned, and a synchronous server renders only when ticked. At most FIRST_IMAGE_TICKS ticks within
        env.carla.first_frame_timeout_s (a cold server is slow). A server that answers its RPC port but sends no
        frames, or no images, fails with NoSensorDataError saying which and what to check."""
        k = self.cfg.carla
        tick_timeout = max(k.timeout_s, k.first_frame_timeout_s)
        first = None
        for _ in range(FIRST_IMAGE_TICKS):
            try:
                frame = int(self._world.tick(tick_timeout))
            except RuntimeError as err:
                if TIME_OUT not in str(err):
                    raise
                # The RPC calls of the take-over went through: it is the frames that do not arrive.
                raise NoSensorDataError(
                    f"no frame reached this client within {tick_timeout:g} s of a tick ({err}). Frames come on the "
                    f"server's streaming port {k.port + 1}: publish ports {k.port}-{k.port + 2}, not only "
                    f"{k.port} (docker: -p 127.0.0.1:{k.port}-{k.port + 2}:{k.port}-{k.port + 2}), or wait until "
                    "the server has started.") from None
            self._supervisor.alive()
            first = frame if first is None else first
            self._frame = frame
            try:  # an image of any frame since the first tick shows that images flow
                self._inbox.wait(first, k.first_frame_timeout_s / FIRST_IMAGE_TICKS, 0.0)
                return
            except RuntimeError:
                continue
        raise NoSensorDataError(
            f"its camera sent no image in {FIRST_IMAGE_TICKS} ticks ({k.first_frame_timeout_s:g} s, "
            "env.carla.first_frame_timeout_s): the server cannot render (start it with -RenderOffScreen on a "
            "machine with an NVIDIA GPU and its driver; in Docker with --gpus all and NVIDIA_DRIVER_CAPABILITIES=all; "
            f"not -nullrhi), or its sensor stream on port {k.port + 1} is blocked.")

    def _observe(self, image: Any) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        """Signals and state of the last tick: the ego's transform and velocity are the client's snapshot of it,
        the events those stamped with frames up to it."""
        c = self.cfg
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        p, yaw, v = xy(transform.location), heading(transform.rotation), np.array([velocity.x, -velocity.y])
        s, lateral, lane_heading, half_width = self._route.project(p)
        progress = 0.0 if self._prev_s is None else s - self._prev_s
        self._prev_s = s
        on_lane = self._map.get_waypoint(transform.location, project_to_road=False,
                                         lane_type=self.carla.LaneType.Driving)
        self._in_junction = on_lane is not None and bool(on_lane.is_junction)
        # The direction of the lane the car is in against the route's: the oncoming lane is off by about 180 deg.
        self._lane_error = (None if on_lane is None or self._in_junction
                            else wrap_angle(heading(on_lane.transform.rotation) - lane_heading))
        signals = DrivingSignals(
            speed=float(v @ [math.cos(yaw), math.sin(yaw)]),
            speed_along_lane=float(v @ [math.cos(lane_heading), math.sin(lane_heading)]),
            lateral_offset=lateral, lane_half_width=half_width,
            heading_error=wrap_angle(yaw - lane_heading),
            collision=self._inbox.take("collision", self._frame) > 0, off_road=on_lane is None,
            lane_invasion=self._inbox.take("lane_invasion", self._frame) > 0, progress=progress,
            route_done=s >= self._goal_s)
        points = to_ego_frame(self._route.points_ahead(s, c.lane_points, c.lane_point_spacing), p, yaw)
        gap, closing = self._lead(s, signals)
        # The traffic-light entries come after the lane points (the backend's state tail, av_td3.envs.backends).
        light = self._lights.ahead(s, self.carla) if c.carla.traffic_light else NO_LIGHT  # false: the ablation
        state = np.concatenate([[signals.speed, signals.lateral_offset, signals.heading_error, gap, closing],
                                points.ravel(), light])
        return to_gray(image, c.image.height, c.image.width), state.astype(np.float32), signals

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
            except (RuntimeError, ConfigError) as err:  # what the client and the take-over raise
                self._raise_unless_lost(err)
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
        self._route = build_route(self._map, start, c.carla.route.length_m + c.lane_points * c.lane_point_spacing,
                                  c.carla.route.spacing_m, self._rng)
        self._goal_s = min(c.carla.route.length_m, float(self._route.s[-1]))
        self._lights = LightsAhead.on_route(self._route, self._stop_lines)
        self._ego.set_transform(start)
        self._ego.set_target_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.set_target_angular_velocity(carla.Vector3D(0.0, 0.0, 0.0))
        self._ego.apply_control(carla.VehicleControl(throttle=0.0, steer=0.0, brake=1.0))
        # Before the NPCs are registered with it: the TM seeds each vehicle's generator at registration.
        self._tm.set_random_device_seed(tm_seed)
        free = [p for p in self._spawn_points if p.location.distance(start.location) > FREE_RADIUS_M]
        self._npc_ids = spawn_npcs(self._client, carla.command, self._npc_blueprints, free, c.npcs,
                                   c.carla.traffic_manager_port(), self._rng)
        for _ in range(max(1, math.ceil(SETTLE_S / c.carla.fixed_delta_s))):
            image = self._tick()
        # The teleport, the spawns and the landing are not the agent's doing.
        self._inbox.take("collision", self._frame)
        self._inbox.take("lane_invasion", self._frame)
        self._prev_s = None
        self._rules.reset()
        self._light = None
        return self._observe(image)

    def _sim_step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        steer, throttle_brake = float(action[0]), float(action[1])
        try:
            # our steer > 0 turns left; CARLA's (left-handed world, y to the right) turns right: negate it
            self._ego.apply_control(self.carla.VehicleControl(
                throttle=max(throttle_brake, 0.0), steer=-steer, brake=max(-throttle_brake, 0.0)))
            frame, state, signals = self._observe(self._tick())
            out = frame, state, replace(signals, rule=self._check_rules(signals))
        except (RuntimeError, ConfigError) as err:
            self._raise_unless_lost(err)
            self._recover(err)
            # Nothing happened this step: the base class ends the episode as truncated on the last good observation.
            frame, state, signals = self._last
            return frame, state, replace(signals, collision=False, off_road=False, lane_invasion=False, progress=0.0,
                                         rule="", route_done=False, interrupted=True)
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
        broken = self._rules.check(signals, light_red, self._in_junction, self._lane_error)
        if self._in_junction:
            self._light = None
        return broken

    def _recover(self, err: Exception) -> None:
        """Reconnect with exponential back-off and take the server over again; SimulatorLostError after
        env.carla.max_reconnects failed attempts in a row. This rides out a stalled server; a restarted one has left
        this process's Traffic Manager bound to the dead one, and the CARLA client aborts the process: the worker
        (:mod:`.worker`) then starts a fresh one. Each attempt reports progress to the supervisor; a pending stop
        ends the loop with StopRequested before the next attempt, and cuts its back-off short."""
        c = self.cfg.carla
        while True:
            self._stop_if_pending(err)
            self._supervisor.alive()
            self._failures += 1
            if self._failures > c.max_reconnects:
                raise SimulatorLostError(
                    f"lost the CARLA server at {c.host}:{c.port} ({err}); {c.max_reconnects} reconnect attempt(s) "
                    f"failed. Bring the server back (`{START_SERVER}`) and rerun the same command: training resumes "
                    "from the last checkpoint.") from None
            delay = min(BACKOFF_S * 2 ** (self._failures - 1), MAX_BACKOFF_S)
            log.warning("CARLA at %s:%d: %s; reconnecting in %g s (attempt %d of %d).", c.host, c.port, err, delay,
                        self._failures, c.max_reconnects)
            self._supervisor.wait(delay)
            self._stop_if_pending(err)
            # The old sensors belong to the old connection and are not stopped (that would wait for it); the
            # take-over destroys every vehicle and sensor on the server, ours included.
            self._sensors, self._ego, self._npc_ids, self._on_tick_id = [], None, [], None
            try:
                self._connect()
                self._build()
            except (RuntimeError, ConfigError) as again:
                self._raise_unless_lost(again)
                err = again
                continue
            self.reconnects += 1
            return

    def _stop_if_pending(self, err: Exception) -> None:
        """StopRequested when the run is stopping: a reconnect (a town load) would only eat the stop's grace period."""
        if self._supervisor.stop_pending():
            c = self.cfg.carla
            raise StopRequested(f"CARLA at {c.host}:{c.port} lost ({err}) while the run is stopping: no reconnect")

    def _raise_unless_lost(self, err: Exception) -> None:
        """Return when ``err`` means a lost server (reconnect); raise it otherwise: an unusable server as the
        stop that names the cause and the fix, anything else (a bug) as it is. See :mod:`.errors`."""
        kind = classify(err)
        if kind == UNUSABLE:
            raise unusable(err, self.cfg.carla) from None
        if kind != LOST:
            raise err

    def _destroy(self, ids: list[int]) -> None:
        if ids:
            self._client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in ids], False)

    # --- gymnasium API ------------------------------------------------------------------------------------------
    def _info_extra(self) -> dict:
        return {"reconnects": self.reconnects}

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
                            self.cfg.carla.host, self.cfg.carla.port, err)
            self._client = self._world = self._tm = None
        for path in self._claims:
            release_port(path)
        self._claims = []
