"""Taking a CARLA server over: connect, load or clear the town, force our settings and weather, start the Traffic
Manager, read the map's spawn points and traffic-light stop lines, spawn the ego with its sensors.

:class:`WorldTakeOver` is the half of :class:`~av_td3.envs.carla.env.CarlaSession` that runs at start and after a
reconnect; the session holds the state it sets (``_client``, ``_world``, ``_map``, ``_tm``, ``_ego``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs.base import SimulatorUnusableError
from av_td3.envs.carla.lights import stop_lines
from av_td3.envs.carla.sensors import SensorInbox
from av_td3.envs.carla.traffic import npc_blueprints

log = logging.getLogger(__name__)

EGO_BLUEPRINT = "vehicle.tesla.model3"
# Loading a town takes far longer than any other call; env.carla.timeout_s is meant for those.
LOAD_WORLD_TIMEOUT_S = 60.0
# Episode starts are picked away from other vehicles, and NPCs away from the ego's start: a car spawned onto
# another would end the episode at once.
FREE_RADIUS_M = 10.0


class WorldTakeOver:
    """Start-up and reconnect half of the CARLA session (see the module doc). ``carla`` is the client module."""

    carla: Any
    cfg: EnvConfig
    _supervisor: Any  # the session's Supervisor (env.py): progress is reported to it
    # Set by the session (env.py) before the take-over runs:
    _rng: np.random.Generator
    _weather: Any  # the env.carla.weather preset
    _original_settings: Any  # the server's settings before our first take-over (None until then), restored at close
    _sensors: list[Any]
    _npc_ids: list[int]
    _first_images: Callable[[], None]  # the session's method: tick until the new camera's images flow

    # --- config ----------------------------------------------------------------------------------------------
    def _weather_preset(self, name: str) -> Any:
        params = self.carla.WeatherParameters
        preset = getattr(params, name, None)
        if not isinstance(preset, params):
            names = sorted(n for n in dir(params) if isinstance(getattr(params, n), params))
            raise ConfigError(f"env.carla.weather={name!r} is not a CARLA weather preset: choose one of "
                              f"{', '.join(names)}.")
        return preset

    # --- connection and world set-up --------------------------------------------------------------------------
    def _connect(self) -> None:
        c = self.cfg.carla
        client = self.carla.Client(c.host, c.port)
        client.set_timeout(c.timeout_s)
        server = client.get_server_version()  # the first call that needs the server: fails after timeout_s
        self._supervisor.alive()
        if server != client.get_client_version():
            log.warning("CARLA server %s at %s:%d differs from the client %s: use the carlasim/carla:0.9.16 image.",
                        server, c.host, c.port, client.get_client_version())
        self._client = client

    def _build(self) -> None:
        """Take the server over (at start and after a reconnect): a clean town, our world settings and weather,
        the Traffic Manager, the ego and its sensors, the map's traffic lights. NPCs come at reset."""
        c = self.cfg.carla
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
        world = self._clean_world(world)  # a town load: up to LOAD_WORLD_TIMEOUT_S
        self._supervisor.alive()
        self._world, self._map = world, world.get_map()  # from here on close() restores the settings
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = c.fixed_delta_s
        settings.no_rendering_mode = False  # the camera renders nothing otherwise
        world.apply_settings(settings)
        world.set_weather(self._weather)
        tm = self._client.get_trafficmanager(c.traffic_manager_port())
        tm.set_synchronous_mode(True)  # else the TM drives the NPCs on its own clock, not our ticks
        self._tm = tm
        self._spawn_points = self._map.get_spawn_points()
        self._library = world.get_blueprint_library()
        self._npc_blueprints = npc_blueprints(self._library, list(c.npc_types))
        self._stop_lines = stop_lines(world)
        self._spawn_ego()
        self._first_images()  # the new actors exist from the next frame on; their images may come later still

    def _clean_world(self, world: Any) -> Any:
        """Load env.town afresh, or (env.carla.load_world=false, town already loaded) destroy every vehicle and
        sensor on it: a killed run's parked cars and cameras must not stay in the lanes or on the GPU."""
        c, town = self.cfg.carla, self.cfg.town
        if c.load_world or world.get_map().name.rsplit("/", 1)[-1] != town:
            return self._load_town(town)
        strays = [a.id for a in world.get_actors() if a.type_id.startswith(("vehicle.", "sensor."))]
        if strays:
            log.warning("destroying %d vehicles and sensors left on the CARLA server at %s:%d "
                        "(env.carla.load_world=false).", len(strays), c.host, c.port)
            self._client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in strays], False)
        return world

    def _load_town(self, town: str) -> Any:
        c = self.cfg.carla
        available = sorted(m.rsplit("/", 1)[-1] for m in self._client.get_available_maps())
        if town not in available:
            raise ConfigError(f"env.town={town!r} is not a map of the CARLA server at {c.host}:{c.port}: choose one "
                              f"of {', '.join(available)}.")
        self._client.set_timeout(max(c.timeout_s, LOAD_WORLD_TIMEOUT_S))
        try:
            return self._client.load_world(town)
        finally:
            self._client.set_timeout(c.timeout_s)

    def _spawn_ego(self) -> None:
        """The ego at a free spawn point (``try_spawn_actor`` down the start candidates), then its camera,
        collision and lane-invasion sensors and our on-tick callback, all feeding a fresh inbox."""
        carla, c, world, library = self.carla, self.cfg.carla, self._world, self._library
        ego_bp = library.find(EGO_BLUEPRINT)
        ego_bp.set_attribute("role_name", "hero")
        for point in self._start_candidates():
            self._ego = world.try_spawn_actor(ego_bp, point)
            if self._ego is not None:
                break
        else:
            where = (f"spawn point env.carla.route.start_index={c.route.start_index}" if c.route.start_index >= 0
                     else f"any of the {len(self._spawn_points)} spawn points")
            raise SimulatorUnusableError(
                f"the ego cannot be spawned at {where} of {self.cfg.town}: another client's vehicles occupy it. Stop "
                "the other client, or pick another start (env.carla.route.start_index).")
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
        """env.carla.route.start_index's spawn point, or all of them in a seeded order, those away from vehicles
        that are not ours (another client's) first."""
        points, index = self._spawn_points, self.cfg.carla.route.start_index
        if index >= 0:
            if index >= len(points):
                raise ConfigError(f"env.carla.route.start_index={index} but {self.cfg.town} has {len(points)} spawn "
                                  f"points: use 0..{len(points) - 1}, or -1 for a seeded random one.")
            return [points[index]]
        ours = set(self._npc_ids) | ({self._ego.id} if self._ego is not None else set())
        others = [a.get_location() for a in self._world.get_actors().filter("vehicle.*") if a.id not in ours]
        free: list[Any] = []
        taken: list[Any] = []
        for i in self._rng.permutation(len(points)):
            point = points[int(i)]
            (free if all(point.location.distance(car) > FREE_RADIUS_M for car in others) else taken).append(point)
        return free + taken
