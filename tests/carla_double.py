"""``FakeCarlaModule``: a TEST DOUBLE of the part of the CARLA 0.9.16 Python client that ``CarlaDrivingEnv`` uses.

It is not a simulator and not a copy of CARLA: it answers the same calls with the same shapes (``Client``,
``World``, ``WorldSettings``, ``TrafficManager``, ``command.*`` batches, sensors with ``listen``/``stop``, ``Image``
with ``frame`` and BGRA ``raw_data``, ``Map``/``Waypoint``), so the env's logic can be tested without a server. Pass
an instance as ``CarlaDrivingEnv(cfg, seed, carla_module=FakeCarlaModule())``.

The world is one straight road along CARLA's +x axis with three 3.5 m lanes centred at y = 0, 3.5 and 7 (CARLA's y
points right), spawn points every 20 m on each lane, and a crude car model for the ego. Every call that matters is
appended to ``server.calls`` so tests can check what reached the "server", and in which order. Faults are switched
on through ``server``: ``down`` (every call times out, as the real client does), ``timeouts_on_tick`` (the next N
ticks time out), ``stale_images`` (each tick first delivers an image of the previous frame), ``collide_at``.
"""

from __future__ import annotations

import fnmatch
import math
from types import SimpleNamespace
from typing import Any, Callable

LANE_WIDTH = 3.5
LANES_Y = (0.0, 3.5, 7.0)
SPAWN_X = tuple(range(0, 200, 20))


# ------------------------------------------------------------------------------------------------ value types
class Vector3D:
    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self.x, self.y, self.z = float(x), float(y), float(z)

    def distance(self, other: "Vector3D") -> float:
        return math.dist((self.x, self.y, self.z), (other.x, other.y, other.z))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(x={self.x:g}, y={self.y:g}, z={self.z:g})"


class Location(Vector3D):
    pass


class Rotation:
    def __init__(self, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> None:
        self.pitch, self.yaw, self.roll = float(pitch), float(yaw), float(roll)


class Transform:
    def __init__(self, location: Location | None = None, rotation: Rotation | None = None) -> None:
        self.location = location or Location()
        self.rotation = rotation or Rotation()


class VehicleControl:
    def __init__(self, throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0, hand_brake: bool = False,
                 reverse: bool = False) -> None:
        self.throttle, self.steer, self.brake = throttle, steer, brake
        self.hand_brake, self.reverse = hand_brake, reverse


class WorldSettings:
    def __init__(self, synchronous_mode: bool = False, no_rendering_mode: bool = False,
                 fixed_delta_seconds: float | None = None) -> None:
        self.synchronous_mode = synchronous_mode
        self.no_rendering_mode = no_rendering_mode
        self.fixed_delta_seconds = fixed_delta_seconds

    def copy(self) -> "WorldSettings":
        return WorldSettings(self.synchronous_mode, self.no_rendering_mode, self.fixed_delta_seconds)


class WeatherParameters:
    def __init__(self, name: str) -> None:
        self.name = name

    # A parameter, as on the real class: not a preset.
    cloudiness = property(lambda self: 0.0)


for _preset in ("ClearNoon", "CloudyNoon", "WetNoon", "HardRainNoon", "ClearSunset", "Default"):
    setattr(WeatherParameters, _preset, WeatherParameters(_preset))


class LaneType:
    Driving = "Driving"


class Image:
    """A camera image; every pixel holds ``frame % 256`` in B, G and R so a test can tell frames apart."""

    def __init__(self, frame: int, width: int, height: int) -> None:
        self.frame, self.width, self.height = frame, width, height
        value = frame % 256
        self.raw_data = bytes([value, value, value, 255]) * (width * height)


class CollisionEvent:
    def __init__(self, frame: int, other_actor: Any = None) -> None:
        self.frame, self.other_actor = frame, other_actor


class LaneInvasionEvent:
    def __init__(self, frame: int) -> None:
        self.frame, self.crossed_lane_markings = frame, ["Broken"]


# ---------------------------------------------------------------------------------------------------- actors
class ActorBlueprint:
    def __init__(self, id: str, **attributes: str) -> None:
        self.id = id
        self.attributes = dict(attributes)

    def has_attribute(self, key: str) -> bool:
        return key in self.attributes

    def get_attribute(self, key: str) -> str:
        return self.attributes[key]

    def set_attribute(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("blueprint attributes are set as strings")
        self.attributes[key] = value


class BlueprintLibrary:
    def __init__(self) -> None:
        self._all = [ActorBlueprint(EGO, number_of_wheels="4"),
                     ActorBlueprint("vehicle.audi.a2", number_of_wheels="4"),
                     ActorBlueprint("vehicle.bh.crossbike", number_of_wheels="2"),
                     ActorBlueprint("sensor.camera.rgb", image_size_x="800", image_size_y="600", fov="90"),
                     ActorBlueprint("sensor.other.collision"),
                     ActorBlueprint("sensor.other.lane_invasion")]

    def find(self, id: str) -> ActorBlueprint:
        for bp in self._all:
            if bp.id == id:
                return ActorBlueprint(bp.id, **bp.attributes)
        raise IndexError(f"blueprint {id!r} not found")

    def filter(self, pattern: str) -> list[ActorBlueprint]:
        return [ActorBlueprint(bp.id, **bp.attributes) for bp in self._all if fnmatch.fnmatch(bp.id, pattern)]


EGO = "vehicle.tesla.model3"


class Actor:
    def __init__(self, server: "FakeServer", blueprint: ActorBlueprint, transform: Transform,
                 parent: "Actor | None" = None) -> None:
        self._server = server
        self.id = server.next_id()
        self.type_id = blueprint.id
        self.attributes = dict(blueprint.attributes)
        self.parent = parent
        self.transform = Transform(Location(transform.location.x, transform.location.y, transform.location.z),
                                   Rotation(transform.rotation.pitch, transform.rotation.yaw, transform.rotation.roll))
        self.speed = 0.0
        self.control = VehicleControl()
        self.autopilot_port: int | None = None

    def get_transform(self) -> Transform:
        self._server.check()
        return self.transform

    def get_location(self) -> Location:
        return self.get_transform().location

    def get_velocity(self) -> Vector3D:
        self._server.check()
        yaw = math.radians(self.transform.rotation.yaw)
        return Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def set_transform(self, transform: Transform) -> None:
        self._server.check()
        self._server.calls.append(("set_transform", self.id, transform.location.x, transform.location.y))
        self.transform = Transform(Location(transform.location.x, transform.location.y, transform.location.z),
                                   Rotation(transform.rotation.pitch, transform.rotation.yaw))

    def set_target_velocity(self, velocity: Vector3D) -> None:
        self._server.check()
        self.speed = math.hypot(velocity.x, velocity.y)

    def set_target_angular_velocity(self, velocity: Vector3D) -> None:
        self._server.check()

    def apply_control(self, control: VehicleControl) -> None:
        self._server.check()
        self._server.calls.append(("apply_control", control.throttle, control.steer, control.brake))
        self.control = control


class Sensor(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback: Callable[[Any], None] | None = None

    def listen(self, callback: Callable[[Any], None]) -> None:
        self._server.check()
        self.callback = callback

    def stop(self) -> None:
        self._server.check()
        self._server.calls.append(("stop", self.id))
        self.callback = None


# --------------------------------------------------------------------------------------------------- the map
class Waypoint:
    def __init__(self, x: float, lane_y: float) -> None:
        self.transform = Transform(Location(x, lane_y, 0.0), Rotation(yaw=0.0))
        self.lane_width = LANE_WIDTH

    def next(self, distance: float) -> list["Waypoint"]:
        return [Waypoint(self.transform.location.x + distance, self.transform.location.y)]


class Map:
    def __init__(self, town: str) -> None:
        self.name = f"Carla/Maps/{town}"

    def get_spawn_points(self) -> list[Transform]:
        return [Transform(Location(x, y, 0.3), Rotation(yaw=0.0)) for y in LANES_Y for x in SPAWN_X]

    def get_waypoint(self, location: Location, project_to_road: bool = True,
                     lane_type: str = LaneType.Driving) -> Waypoint | None:
        lane_y = min(LANES_Y, key=lambda y: abs(y - location.y))
        if not project_to_road and abs(location.y - lane_y) > LANE_WIDTH / 2:
            return None  # off the road
        return Waypoint(location.x, lane_y)


class ActorList(list):
    def filter(self, pattern: str) -> "ActorList":
        return ActorList(a for a in self if fnmatch.fnmatch(a.type_id, pattern))


# ----------------------------------------------------------------------------------------------------- server
class FakeServer:
    """What a CARLA server holds, shared by every client of one FakeCarlaModule (so a reconnect finds it)."""

    def __init__(self, town: str = "Town01") -> None:
        self.town = town
        self.maps = ["Town01", "Town02", "Town10HD_Opt"]
        self.settings = WorldSettings(synchronous_mode=False, fixed_delta_seconds=None)
        self.weather: WeatherParameters | None = None
        self.actors: dict[int, Actor] = {}
        self.frame = 100
        self.calls: list[tuple] = []
        self.clients: list["Client"] = []
        self.version = "0.9.16"
        self.timeout_s = 5.0
        self._ids = 1000
        self.tm: TrafficManager | None = None
        # faults
        self.down = False
        self.timeouts_on_tick = 0
        self.stale_images = False
        self.collide_at: set[int] = set()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def check(self) -> None:
        if self.down:
            raise RuntimeError(f"time-out of {int(self.timeout_s * 1000)}ms while waiting for the simulator, make "
                               "sure the simulator is ready and connected")

    def of_type(self, prefix: str) -> list[Actor]:
        return [a for a in self.actors.values() if a.type_id.startswith(prefix)]

    def spawn(self, blueprint: ActorBlueprint, transform: Transform, parent: Actor | None = None) -> Actor:
        if blueprint.id.startswith("vehicle.") and any(
                a.transform.location.distance(transform.location) < 1.0 for a in self.of_type("vehicle.")):
            raise RuntimeError("Spawn failed because of collision at spawn position")
        actor = (Sensor if blueprint.id.startswith("sensor.") else Actor)(self, blueprint, transform, parent)
        self.actors[actor.id] = actor
        return actor

    def tick(self, dt: float) -> int:
        self.frame += 1
        for actor in self.of_type("vehicle."):
            if actor.autopilot_port is None:  # the ego: a crude car model
                c = actor.control
                actor.speed = max(0.0, actor.speed + (4.0 * c.throttle - 8.0 * c.brake) * dt)
                actor.transform.rotation.yaw += 30.0 * c.steer * dt * (actor.speed > 0)
            yaw = math.radians(actor.transform.rotation.yaw)
            old_y = actor.transform.location.y
            actor.transform.location.x += actor.speed * math.cos(yaw) * dt
            actor.transform.location.y += actor.speed * math.sin(yaw) * dt
            if actor.autopilot_port is None:
                self._sense(actor, old_y)

    def _sense(self, ego: Actor, old_y: float) -> None:
        boundaries = [y + LANE_WIDTH / 2 for y in LANES_Y] + [LANES_Y[0] - LANE_WIDTH / 2]
        crossed = any(min(old_y, ego.transform.location.y) < b <= max(old_y, ego.transform.location.y)
                      for b in boundaries)
        for sensor in [a for a in self.of_type("sensor.") if a.parent is ego and a.callback]:
            if sensor.type_id == "sensor.camera.rgb":
                w, h = int(sensor.attributes["image_size_x"]), int(sensor.attributes["image_size_y"])
                if self.stale_images:
                    sensor.callback(Image(self.frame - 1, w, h))
                sensor.callback(Image(self.frame, w, h))
            elif sensor.type_id == "sensor.other.collision" and self.frame in self.collide_at:
                sensor.callback(CollisionEvent(self.frame))
            elif sensor.type_id == "sensor.other.lane_invasion" and crossed:
                sensor.callback(LaneInvasionEvent(self.frame))


class TrafficManager:
    def __init__(self, server: FakeServer, port: int) -> None:
        self._server, self.port = server, port
        self.synchronous = False
        self.seed: int | None = None

    def set_synchronous_mode(self, mode: bool = True) -> None:
        self._server.check()
        self._server.calls.append(("tm.set_synchronous_mode", mode))
        self.synchronous = mode

    def set_random_device_seed(self, seed: int) -> None:
        self._server.check()
        self._server.calls.append(("tm.set_random_device_seed", seed))
        self.seed = seed


class World:
    def __init__(self, server: FakeServer) -> None:
        self._server = server

    def get_settings(self) -> WorldSettings:
        self._server.check()
        return self._server.settings.copy()

    def apply_settings(self, settings: WorldSettings) -> int:
        self._server.check()
        self._server.calls.append(("apply_settings", settings.synchronous_mode, settings.fixed_delta_seconds))
        self._server.settings = settings.copy()
        return self._server.frame

    def get_map(self) -> Map:
        self._server.check()
        return Map(self._server.town)

    def set_weather(self, weather: WeatherParameters) -> None:
        self._server.check()
        self._server.calls.append(("set_weather", weather.name))
        self._server.weather = weather

    def get_blueprint_library(self) -> BlueprintLibrary:
        self._server.check()
        return BlueprintLibrary()

    def spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None) -> Actor:
        self._server.check()
        self._server.calls.append(("spawn_actor", blueprint.id))
        return self._server.spawn(blueprint, transform, attach_to)

    def get_actors(self, actor_ids: list[int] | None = None) -> "ActorList":
        self._server.check()
        actors = self._server.actors
        return ActorList(actors.values() if actor_ids is None else [actors[i] for i in actor_ids if i in actors])

    def tick(self, seconds: float = 10.0) -> int:
        server = self._server
        server.check()
        server.calls.append(("tick", seconds))
        if server.timeouts_on_tick > 0:
            server.timeouts_on_tick -= 1
            raise RuntimeError(f"time-out of {int(seconds * 1000)}ms while waiting for the simulator")
        if not server.settings.synchronous_mode:
            raise RuntimeError("tick() called in asynchronous mode")
        server.tick(server.settings.fixed_delta_seconds)
        return server.frame


# ------------------------------------------------------------------------------------------------- commands
class FutureActor:
    """Stands for the actor spawned by the command a ``then`` hangs on."""


class SpawnActor:
    def __init__(self, blueprint: ActorBlueprint, transform: Transform, parent: Any = None) -> None:
        self.blueprint, self.transform, self.parent = blueprint, transform, parent
        self.next: Any = None

    def then(self, command: Any) -> "SpawnActor":
        self.next = command
        return self


class SetAutopilot:
    def __init__(self, actor: Any, enabled: bool, port: int = 8000) -> None:
        self.actor, self.enabled, self.port = actor, enabled, port


class DestroyActor:
    def __init__(self, actor: Any) -> None:
        self.actor_id = actor if isinstance(actor, int) else actor.id


class Response:
    def __init__(self, actor_id: int = 0, error: str = "") -> None:
        self.actor_id, self.error = actor_id, error

    def has_error(self) -> bool:
        return bool(self.error)


# --------------------------------------------------------------------------------------------------- client
class Client:
    def __init__(self, server: FakeServer, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self._server, self.host, self.port = server, host, port
        server.calls.append(("Client", host, port))
        server.clients.append(self)

    def set_timeout(self, seconds: float) -> None:
        self._server.calls.append(("set_timeout", seconds))
        self._server.timeout_s = seconds

    def get_client_version(self) -> str:
        return "0.9.16"

    def get_server_version(self) -> str:
        self._server.check()
        return self._server.version

    def get_world(self) -> World:
        self._server.check()
        return World(self._server)

    def get_available_maps(self) -> list[str]:
        self._server.check()
        return [f"/Game/Carla/Maps/{m}" for m in self._server.maps]

    def load_world(self, map_name: str, reset_settings: bool = True) -> World:
        server = self._server
        server.check()
        server.calls.append(("load_world", map_name, server.timeout_s))
        if map_name not in server.maps:
            raise RuntimeError(f"map '{map_name}' not found")
        server.town, server.actors = map_name, {}
        if reset_settings:
            server.settings = WorldSettings()
        return World(server)

    def get_trafficmanager(self, client_connection: int = 8000) -> TrafficManager:
        self._server.check()
        self._server.calls.append(("get_trafficmanager", client_connection))
        self._server.tm = TrafficManager(self._server, client_connection)
        return self._server.tm

    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[Response]:
        server = self._server
        server.check()
        server.calls.append(("apply_batch_sync", [type(c).__name__ for c in commands]))
        responses = []
        for command in commands:
            if isinstance(command, DestroyActor):
                responses.append(Response(command.actor_id) if server.actors.pop(command.actor_id, None)
                                 else Response(error="actor not found"))
                continue
            try:
                actor = server.spawn(command.blueprint, command.transform)
            except RuntimeError as err:
                responses.append(Response(error=str(err)))
                continue
            if isinstance(command.next, SetAutopilot) and command.next.actor is FutureActor:
                actor.autopilot_port = command.next.port if command.next.enabled else None
            responses.append(Response(actor.id))
        return responses


class FakeCarlaModule:
    """Stands in for ``import carla``: the classes above, and ``Client`` bound to one :class:`FakeServer`."""

    Location, Rotation, Transform, Vector3D, VehicleControl = Location, Rotation, Transform, Vector3D, VehicleControl
    WorldSettings, WeatherParameters, LaneType = WorldSettings, WeatherParameters, LaneType
    command = SimpleNamespace(SpawnActor=SpawnActor, SetAutopilot=SetAutopilot, DestroyActor=DestroyActor,
                              FutureActor=FutureActor)

    def __init__(self, town: str = "Town01") -> None:
        self.server = FakeServer(town)

    def Client(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> Client:  # noqa: N802
        return Client(self.server, host, port, worker_threads)
