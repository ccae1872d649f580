"""``FakeCarlaModule``: a TEST DOUBLE of the part of the CARLA 0.9.16 Python client that the CARLA env uses.

It is not a simulator and not a copy of CARLA: it answers the same calls with the same shapes, and it is as strict
as the real client where the real client is strict, so the env's tests catch what a real server would:

- **Argument types.** The real client is a Boost.Python extension: a ``float`` parameter accepts ``int``, ``bool``,
  ``float`` and ``numpy.float64`` (a ``float`` subclass) but raises ``ArgumentError`` for ``numpy.float32``; an
  ``int`` parameter raises for ``numpy.int64`` and ``float``; a ``list`` parameter raises for a tuple or generator.
  Every call below declares its parameter kinds with :func:`typed`; ``tests/test_env_carla.py`` checks those names
  and kinds against the installed ``carla`` wheel's own signatures.
- **Asynchronous callbacks.** ``world.tick()`` returns once the client has the new frame's snapshot; sensor data
  (camera images, collision events) and ``on_tick`` callbacks (the client-side lane-invasion sensor among them)
  arrive afterwards on another thread, as on CARLA's streaming threads. ``server.delays`` delays each kind.
- **Cached snapshots.** ``get_transform``/``get_velocity``/``get_location`` read the client's copy of the last
  tick, never the server: they answer while the server is down, do not see a ``set_transform`` before the next
  tick, and read zeros for an actor the client has not yet seen in a snapshot. Tests that move actors by hand call
  ``server.publish()`` to refresh that copy without a tick.
- **A per-process Traffic Manager.** ``get_trafficmanager(port)`` returns the one this "process" (one
  ``FakeCarlaModule``) already made for that port, as ``TrafficManager::GetTM`` does. After ``server.restart()``
  that Traffic Manager is bound to the dead server: any use of it, and any tick while it drives in synchronous
  mode, raises :class:`ProcessAborted` (the real client's worker thread aborts the whole process, carla#7597).
- **A map with a curve and a junction.** Road A runs along CARLA's +x from x=0 to 200 with three 3.5 m lanes
  centred at y = 0, 3.5 and 7 (CARLA's y points right), and one oncoming lane (lane id -1, along -x, no spawn
  points) centred at y = -3.5, to the left of the y = 0 lane as on a right-hand-traffic road. At x=200 a junction:
  every lane goes straight on (road B,
  to x=400), and the right lane (y=7) may also turn right along a quarter circle of radius 20 m onto road C, which
  runs along +y. Spawn points every 20 m on each lane of road A. One traffic light guards the junction: its trigger
  area is road A's last 10 m, its stop waypoints at x=200 on road A's lanes, its state ``server.light_state``
  (green unless a test sets it).

Every call that matters is appended to ``server.calls`` so tests can check what reached the "server", and in
which order. Faults are switched on through ``server``: ``down`` (every call times out, as the real client does),
``timeouts_on_tick`` (the next N ticks time out), ``stale_images`` (each tick first delivers an image of the
previous frame), ``collide_at`` (frames with a collision), ``delays`` (seconds after a tick each kind of callback
arrives), ``restart()`` (the server process dies and a fresh one starts on the same port), ``new_map_failures``
(the next N ``load_world`` calls fail as a cold server's do), ``host_ports_in_use`` (ports another program on the
client's machine holds: a Traffic Manager made on one fails to bind). Errors carry the real client's words
(``DESTROYED_ACTOR``, ``NEW_MAP_FAILED``, ``TM_BIND_ERROR``). A map load or a restart starts a new episode: actors
of the old one fail with ``DESTROYED_ACTOR`` and every Traffic Manager forgets the vehicles it drove
(``TrafficManagerLocal::Reset``).
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import math
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

LANE_WIDTH = 3.5
LANES_Y = (0.0, 3.5, 7.0)
SPAWN_X = tuple(range(0, 200, 20))
JUNCTION_X = 200.0  # road A ends and the junction begins here
LIGHT_AREA_M = 10.0  # the traffic light's trigger area: this long, ending at the junction
TURN_RADIUS = 20.0
ONCOMING_Y = LANES_Y[0] - LANE_WIDTH  # road A's oncoming lane (traffic along -x)
EGO = "vehicle.tesla.model3"
# The real client's words (carla 0.9.16), for the failures the double raises.
DESTROYED_ACTOR = ("trying to operate on a destroyed actor; an actor's function was called, but the actor is already "
                   "destroyed.")
NEW_MAP_FAILED = "failed to connect to newly created map"
TM_BIND_ERROR = ("trying to create rpc server for traffic manager; but the system failed to create because of bind "
                 "error.")


# --------------------------------------------------------------------------------------- strict arguments
class ArgumentError(TypeError):
    """What Boost.Python raises when an argument does not convert (``Boost.Python.ArgumentError``)."""


class ProcessAborted(BaseException):
    """Stands for the real client aborting the whole process (no ``except Exception`` catches it)."""


def _accepts(kind: Any, value: Any) -> bool:
    """Whether Boost.Python would convert ``value`` to a parameter of ``kind``."""
    if isinstance(kind, tuple):
        return any(_accepts(k, value) for k in kind)
    if kind is float:  # C++ double/float: Python int, bool and float (numpy.float64 subclasses float)
        return type(value) in (int, bool, float) or isinstance(value, float)
    if kind in (int, bool):  # C++ integer/bool: Python int and bool only (numpy.int64 is not an int)
        return type(value) in (int, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is list:  # boost::python::list: a real list, not any iterable
        return isinstance(value, list)
    return isinstance(value, kind)


def typed(**kinds: Any) -> Callable:
    """Declare the kinds of a call's parameters (by name); arguments that would not convert raise
    :class:`ArgumentError`, as the real client does. The kinds are kept on the function for the signature test."""

    def wrap(fn: Callable) -> Callable:
        import inspect

        signature = inspect.signature(fn)

        def checked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            for name, value in bound.arguments.items():
                kind = kinds.get(name)
                if kind is not None and not _accepts(kind, value):
                    raise ArgumentError(f"Python argument types in {fn.__qualname__}({name}={type(value).__name__})"
                                        " did not match C++ signature")
            return fn(*args, **kwargs)

        checked.__wrapped__ = fn  # type: ignore[attr-defined]
        checked.__name__, checked.__qualname__, checked.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        checked.carla_kinds = dict(kinds)  # type: ignore[attr-defined]
        return checked

    return wrap


# ------------------------------------------------------------------------------------------------ value types
class Vector3D:
    @typed(x=float, y=float, z=float)
    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self.x, self.y, self.z = float(x), float(y), float(z)

    def distance(self, location: "Vector3D") -> float:
        return math.dist((self.x, self.y, self.z), (location.x, location.y, location.z))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(x={self.x:g}, y={self.y:g}, z={self.z:g})"


class Location(Vector3D):
    pass


class Rotation:
    @typed(pitch=float, yaw=float, roll=float)
    def __init__(self, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> None:
        self.pitch, self.yaw, self.roll = float(pitch), float(yaw), float(roll)


_DEFAULT = object()


class Transform:
    def __init__(self, location: Any = _DEFAULT, rotation: Any = _DEFAULT) -> None:
        # The real constructor has defaults but refuses an explicit None (or anything not a Location/Rotation).
        location = Location() if location is _DEFAULT else location
        rotation = Rotation() if rotation is _DEFAULT else rotation
        for name, value, kind in (("location", location, Location), ("rotation", rotation, Rotation)):
            if not isinstance(value, kind):
                raise ArgumentError(f"Transform.__init__({name}={type(value).__name__}) did not match C++ signature")
        self.location = copy_location(location)
        self.rotation = Rotation(rotation.pitch, rotation.yaw, rotation.roll)

    def copy(self) -> "Transform":
        return Transform(self.location, self.rotation)


def copy_location(location: Vector3D) -> Location:
    return Location(location.x, location.y, location.z)


class VehicleControl:
    @typed(throttle=float, steer=float, brake=float, hand_brake=bool, reverse=bool)
    def __init__(self, throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0, hand_brake: bool = False,
                 reverse: bool = False) -> None:
        self.throttle, self.steer, self.brake = float(throttle), float(steer), float(brake)
        self.hand_brake, self.reverse = bool(hand_brake), bool(reverse)


class WorldSettings:
    def __init__(self, synchronous_mode: bool = False, no_rendering_mode: bool = False,
                 fixed_delta_seconds: float | None = None) -> None:
        self.synchronous_mode = synchronous_mode
        self.no_rendering_mode = no_rendering_mode
        self.fixed_delta_seconds = fixed_delta_seconds

    def __setattr__(self, name: str, value: Any) -> None:
        kind = {"synchronous_mode": bool, "no_rendering_mode": bool, "fixed_delta_seconds": float}[name]
        if not (value is None and name == "fixed_delta_seconds") and not _accepts(kind, value):
            raise ArgumentError(f"WorldSettings.{name} = {type(value).__name__} did not match C++ signature")
        super().__setattr__(name, value)

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
    Driving = 2  # an enum of int values on the real client


class TrafficLightState:
    Red, Yellow, Green, Off, Unknown = range(5)  # an enum of int values on the real client


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


class WorldSnapshot:
    def __init__(self, frame: int, elapsed_seconds: float) -> None:
        self.frame, self.elapsed_seconds = frame, elapsed_seconds


# ---------------------------------------------------------------------------------------------------- actors
class ActorBlueprint:
    def __init__(self, id: str, **attributes: str) -> None:
        self.id = id
        self.attributes = dict(attributes)

    @typed(key=str)
    def has_attribute(self, key: str) -> bool:
        return key in self.attributes

    @typed(key=str)
    def get_attribute(self, key: str) -> str:
        return self.attributes[key]

    @typed(key=str, value=str)
    def set_attribute(self, key: str, value: str) -> None:
        self.attributes[key] = value


# Not sorted, as the server lists them; base_type as on CARLA 0.9.16's vehicle blueprints.
VEHICLES = (("vehicle.mitsubishi.fusorosa", "bus", "4"), ("vehicle.audi.a2", "car", "4"),
            ("vehicle.carlamotors.carlacola", "truck", "4"), (EGO, "car", "4"),
            ("vehicle.bh.crossbike", "bicycle", "2"), ("vehicle.nissan.micra", "car", "4"),
            ("vehicle.ford.ambulance", "van", "4"), ("vehicle.citroen.c3", "car", "4"),
            ("vehicle.kawasaki.ninja", "motorcycle", "2"))


class BlueprintLibrary:
    def __init__(self, blueprints: list[ActorBlueprint] | None = None) -> None:
        self._all = blueprints if blueprints is not None else (
            [ActorBlueprint(i, base_type=t, number_of_wheels=w) for i, t, w in VEHICLES]
            + [ActorBlueprint("sensor.camera.rgb", image_size_x="800", image_size_y="600", fov="90"),
               ActorBlueprint("sensor.other.collision"), ActorBlueprint("sensor.other.lane_invasion")])

    @typed(id=str)
    def find(self, id: str) -> ActorBlueprint:
        for bp in self._all:
            if bp.id == id:
                return ActorBlueprint(bp.id, **bp.attributes)
        raise IndexError(f"blueprint {id!r} not found")

    @typed(wildcard_pattern=str)
    def filter(self, wildcard_pattern: str) -> "BlueprintLibrary":
        return BlueprintLibrary([ActorBlueprint(bp.id, **bp.attributes) for bp in self._all
                                 if fnmatch.fnmatch(bp.id, wildcard_pattern)])

    def __iter__(self):
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)


class Actor:
    def __init__(self, server: "FakeServer", blueprint: ActorBlueprint, transform: Transform,
                 parent: "Actor | None" = None) -> None:
        self._server = server
        self.id = server.next_id()
        self.type_id = blueprint.id
        self.attributes = dict(blueprint.attributes)
        self.parent = parent
        self.transform = transform.copy()  # the server's state; the client reads snapshots of it
        self.speed = 0.0
        self.control = VehicleControl()
        self.autopilot_port: int | None = None
        self.episode = server.episode  # the episode (map load, server run) the actor belongs to

    def _alive(self) -> None:
        """An actor of an episode that is gone (a map reload, a server restart) or destroyed fails as on the real
        client; a server that does not answer times out first."""
        self._server.check()
        if self.episode != self._server.episode or self._server.actors.get(self.id) is not self:
            raise RuntimeError(DESTROYED_ACTOR)

    def _episode_alive(self) -> None:
        self._server.check()
        if self.episode != self._server.episode:
            raise RuntimeError(DESTROYED_ACTOR)

    def get_transform(self) -> Transform:
        """The client's cached snapshot of the last tick: no server call (zeros when not in the snapshot)."""
        cached = self._server.snapshot.get(self.id)
        return cached[0].copy() if cached else Transform()

    def get_location(self) -> Location:
        return self.get_transform().location

    def get_velocity(self) -> Vector3D:
        cached = self._server.snapshot.get(self.id)
        return Vector3D(*cached[1]) if cached else Vector3D()

    def get_traffic_light(self) -> "TrafficLight | None":
        """The light whose trigger area (the last LIGHT_AREA_M of road A, before the junction) the snapshot puts
        this vehicle in, else None."""
        location = self.get_transform().location
        inside = JUNCTION_X - LIGHT_AREA_M <= location.x < JUNCTION_X and LANES_Y[0] - LANE_WIDTH / 2 <= location.y \
            <= LANES_Y[-1] + LANE_WIDTH / 2
        return self._server.traffic_light if inside and self.id in self._server.snapshot else None

    # set_transform, set_target_*velocity and apply_control send no answer back on the real client, but an actor of
    # an episode that is gone fails before anything is sent (EpisodeProxy::Lock).
    @typed(transform=Transform)
    def set_transform(self, transform: Transform) -> None:
        self._episode_alive()
        self._server.calls.append(("set_transform", self.id, transform.location.x, transform.location.y))
        self.transform = transform.copy()

    @typed(velocity=Vector3D)
    def set_target_velocity(self, velocity: Vector3D) -> None:
        self._episode_alive()
        self.speed = math.hypot(velocity.x, velocity.y)

    @typed(angular_velocity=Vector3D)
    def set_target_angular_velocity(self, angular_velocity: Vector3D) -> None:
        self._episode_alive()

    @typed(control=VehicleControl)
    def apply_control(self, control: VehicleControl) -> None:
        self._episode_alive()
        self._server.calls.append(("apply_control", control.throttle, control.steer, control.brake))
        self.control = control


class Sensor(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback: Callable[[Any], None] | None = None
        self.frames_seen = 0  # frames since the sensor was spawned

    @property
    def is_listening(self) -> bool:
        return self.callback is not None

    def listen(self, callback: Callable[[Any], None]) -> None:
        self._alive()
        self.callback = callback

    def stop(self) -> None:
        self._server.check()
        self._server.calls.append(("stop", self.id))
        self.callback = None


class TrafficLight:
    """The junction's one traffic light (part of the map: it survives load_world and restarts); its state is
    ``server.light_state``, read like any snapshot. Its stop waypoints are where road A's lanes meet the junction
    (the end of its trigger area), one per lane, as CARLA gives one per lane the light controls."""

    type_id = "traffic.traffic_light"

    def __init__(self, server: "FakeServer") -> None:
        self._server, self.id = server, 1

    def get_state(self) -> int:
        return self._server.light_state

    def get_stop_waypoints(self) -> list["Waypoint"]:
        """A call to the server on the real client (the env makes it once per scene)."""
        self._server.check()
        self._server.calls.append(("get_stop_waypoints", self.id))
        return [Waypoint(lane, lane.length) for lane in self._server.lanes if lane.road_id == 1 and lane.lane_id > 0]


class ActorList(list):
    @typed(wildcard_pattern=str)
    def filter(self, wildcard_pattern: str) -> "ActorList":
        return ActorList(a for a in self if fnmatch.fnmatch(a.type_id, wildcard_pattern))


# --------------------------------------------------------------------------------------------------- the map
class Lane:
    """A one-way lane: a dense centre polyline in CARLA's frame, its successors and whether it is in a junction."""

    def __init__(self, road_id: int, lane_id: int, xy: list[tuple[float, float]], junction: bool = False) -> None:
        self.road_id, self.lane_id, self.junction = road_id, lane_id, junction
        self.xy = xy
        self.s = [0.0]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
            self.s.append(self.s[-1] + math.hypot(x1 - x0, y1 - y0))
        self.length = self.s[-1]
        self.successors: list[Lane] = []

    def at(self, s: float) -> tuple[float, float, float]:
        """(x, y, yaw in degrees) at arc length ``s`` (CARLA's yaw: atan2 in its own frame)."""
        s = min(max(s, 0.0), self.length)
        i = max(1, next((k for k, sk in enumerate(self.s) if sk >= s), len(self.s) - 1))
        (x0, y0), (x1, y1) = self.xy[i - 1], self.xy[i]
        t = (s - self.s[i - 1]) / max(self.s[i] - self.s[i - 1], 1e-9)
        return x0 + t * (x1 - x0), y0 + t * (y1 - y0), math.degrees(math.atan2(y1 - y0, x1 - x0))

    def project(self, x: float, y: float) -> tuple[float, float]:
        """(arc length, distance) of the nearest point of the centre line to (x, y)."""
        best = (0.0, math.inf)
        for k, ((x0, y0), (x1, y1)) in enumerate(zip(self.xy, self.xy[1:])):
            dx, dy = x1 - x0, y1 - y0
            seg = dx * dx + dy * dy
            t = min(max(((x - x0) * dx + (y - y0) * dy) / seg, 0.0), 1.0)
            d = math.hypot(x0 + t * dx - x, y0 + t * dy - y)
            if d < best[1]:
                best = (self.s[k] + t * math.sqrt(seg), d)
        return best


def _line(x0: float, y0: float, x1: float, y1: float, step: float = 2.0) -> list[tuple[float, float]]:
    n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
    return [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n) for k in range(n + 1)]


def build_lanes() -> list[Lane]:
    """Road A (x 0..200), the junction (straight on, and a right turn from the y=7 lane), roads B and C."""
    lanes = []
    for k, y in enumerate(LANES_Y):
        a = Lane(1, k + 1, _line(0.0, y, JUNCTION_X, y))
        through = Lane(2, k + 1, _line(JUNCTION_X, y, JUNCTION_X + TURN_RADIUS, y), junction=True)
        b = Lane(3, k + 1, _line(JUNCTION_X + TURN_RADIUS, y, 400.0, y))
        a.successors, through.successors = [through], [b]
        lanes += [a, through, b]
    right_a = lanes[3 * (len(LANES_Y) - 1)]
    y = LANES_Y[-1]
    arc = [(JUNCTION_X + TURN_RADIUS * math.sin(t), y + TURN_RADIUS - TURN_RADIUS * math.cos(t))
           for t in (math.pi / 2 * k / 16 for k in range(17))]
    turn = Lane(4, 1, arc, junction=True)
    c = Lane(5, 1, _line(arc[-1][0], arc[-1][1], arc[-1][0], arc[-1][1] + 200.0))
    turn.successors = [c]
    right_a.successors = right_a.successors + [turn]
    oncoming = Lane(1, -1, _line(JUNCTION_X, ONCOMING_Y, 0.0, ONCOMING_Y))
    return lanes + [turn, c, oncoming]


class Waypoint:
    def __init__(self, lane: Lane, s: float) -> None:
        self._lane, self.s = lane, s
        x, y, yaw = lane.at(s)
        self.transform = Transform(Location(x, y, 0.0), Rotation(yaw=yaw))
        self.lane_width = LANE_WIDTH
        self.road_id, self.lane_id, self.is_junction = lane.road_id, lane.lane_id, lane.junction

    @typed(distance=float)
    def next(self, distance: float) -> list["Waypoint"]:
        return self._lane_next(self._lane, self.s + distance)

    @staticmethod
    def _lane_next(lane: Lane, s: float) -> list["Waypoint"]:
        if s <= lane.length:
            return [Waypoint(lane, s)]
        out: list[Waypoint] = []
        for successor in lane.successors:  # a dead end (no successor) gives []
            out += Waypoint._lane_next(successor, s - lane.length)
        return out


class Map:
    def __init__(self, town: str, lanes: list[Lane]) -> None:
        self.name = f"Carla/Maps/{town}"
        self._lanes = lanes

    def get_spawn_points(self) -> list[Transform]:
        return [Transform(Location(x, y, 0.3), Rotation(yaw=0.0)) for y in LANES_Y for x in SPAWN_X]

    @typed(location=Location, project_to_road=bool, lane_type=int)
    def get_waypoint(self, location: Location, project_to_road: bool = True,
                     lane_type: int = LaneType.Driving) -> Waypoint | None:
        lane, (s, d) = min(((lane, lane.project(location.x, location.y)) for lane in self._lanes),
                           key=lambda item: item[1][1])
        if not project_to_road and d > LANE_WIDTH / 2:
            return None  # off the road
        return Waypoint(lane, s)


# ----------------------------------------------------------------------------------------------------- server
class FakeServer:
    """What a CARLA server holds, shared by every client of one FakeCarlaModule (so a reconnect finds it), plus the
    client-side snapshot and callback thread (the double has one client "process")."""

    def __init__(self, town: str = "Town01") -> None:
        self.town = town
        self.maps = ["Town01", "Town02", "Town10HD_Opt"]
        self.lanes = build_lanes()
        self.settings = WorldSettings(synchronous_mode=False, fixed_delta_seconds=None)
        self.weather: WeatherParameters | None = None
        self.actors: dict[int, Actor] = {}
        self.frame = 100
        self.elapsed_s = 0.0
        self.generation = 0  # increases at each restart()
        self.episode = 0  # increases at each map load and restart: actors of an earlier episode are gone
        self.traffic_managers: list[TrafficManager] = []  # of every client "process", for the reset on a map load
        self.calls: list[tuple] = []
        self.clients: list["Client"] = []
        self.version = "0.9.16"
        self.timeout_s = 5.0
        self._ids = 1000
        self.snapshot: dict[int, tuple[Transform, tuple[float, float, float]]] = {}
        self.on_tick: dict[int, Callable[[WorldSnapshot], None]] = {}
        self._callback_ids = itertools.count(1)
        self.delivery = Delivery()
        self.traffic_light = TrafficLight(self)
        self.light_state = TrafficLightState.Green
        # faults
        self.down = False
        self.timeouts_on_tick = 0
        self.new_map_failures = 0  # the next N load_world calls fail as on a cold server
        self.streaming = True  # False: the streaming port (port + 1) is unreachable: RPC works, frames never arrive
        self.rendering = True  # False: the server ticks but cannot render: no camera image ever comes
        self.first_image_after = 0  # a new camera sends nothing for its first N frames
        self.host_ports_in_use: set[int] = set()  # ports another program on the client's machine holds
        self.stale_images = False
        self.lane_marking = False  # True: each image's top row is black (a marking), so it is not uniform
        self.collide_at: set[int] = set()
        # Seconds after a tick each kind of callback arrives (images, collisions, on_tick).
        self.delays = {"image": 0.0, "collision": 0.0, "on_tick": 0.0}

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def check(self) -> None:
        if self.down:
            raise RuntimeError(f"time-out of {int(self.timeout_s * 1000)}ms while waiting for the simulator, make "
                               "sure the simulator is ready and connected")

    def of_type(self, prefix: str) -> list[Actor]:
        return [a for a in self.actors.values() if a.type_id.startswith(prefix)]

    def blocked(self, transform: Transform) -> bool:
        return any(a.transform.location.distance(transform.location) < 1.0 for a in self.of_type("vehicle."))

    def spawn(self, blueprint: ActorBlueprint, transform: Transform, parent: Actor | None = None) -> Actor:
        if blueprint.id.startswith("vehicle.") and self.blocked(transform):
            raise RuntimeError("Spawn failed because of collision at spawn position")
        actor = (Sensor if blueprint.id.startswith("sensor.") else Actor)(self, blueprint, transform, parent)
        self.actors[actor.id] = actor
        return actor

    def publish(self) -> None:
        """Refresh the client's snapshot from the server's state (what a tick reports), without a tick."""
        snapshot = {}
        for actor in self.actors.values():
            if actor.parent is not None:
                continue
            yaw = math.radians(actor.transform.rotation.yaw)
            snapshot[actor.id] = (actor.transform.copy(),
                                  (actor.speed * math.cos(yaw), actor.speed * math.sin(yaw), 0.0))
        self.snapshot = snapshot

    def restart(self) -> None:
        """The server process dies and a fresh one starts on the same port: no actors, default settings and map,
        and every Traffic Manager made before is bound to the dead server."""
        self.generation += 1
        self.episode += 1
        self.actors, self.snapshot, self.on_tick = {}, {}, {}
        self.settings = WorldSettings()
        self.down = False
        self.frame += 1000

    def tick(self, dt: float) -> None:
        self.frame += 1
        self.elapsed_s += dt
        old = {a.id: (a.transform.location.x, a.transform.location.y) for a in self.of_type("vehicle.")}
        for actor in self.of_type("vehicle."):
            if actor.autopilot_port is None:  # the ego: a crude car model
                c = actor.control
                actor.speed = max(0.0, actor.speed + (4.0 * c.throttle - 8.0 * c.brake) * dt)
                actor.transform.rotation.yaw += 30.0 * c.steer * dt * (actor.speed > 0)
            yaw = math.radians(actor.transform.rotation.yaw)
            actor.transform.location.x += actor.speed * math.cos(yaw) * dt
            actor.transform.location.y += actor.speed * math.sin(yaw) * dt
        self.publish()  # tick() returns once the client holds the new frame's snapshot
        self._deliver(old)

    def _deliver(self, old: dict[int, tuple[float, float]]) -> None:
        """Queue this frame's callbacks; the delivery thread runs them after tick() has returned."""
        frame, d = self.frame, self.delays
        snapshot = WorldSnapshot(frame, self.elapsed_s)
        for sensor in self.of_type("sensor."):
            ego = sensor.parent
            if ego is None or ego.id not in self.actors:
                continue
            if sensor.type_id == "sensor.camera.rgb":
                sensor.frames_seen += 1
                if not self.rendering or sensor.frames_seen <= self.first_image_after:
                    continue
                w, h = int(sensor.attributes["image_size_x"]), int(sensor.attributes["image_size_y"])
                if self.stale_images:
                    self.delivery.put(d["image"], sensor, Image(frame - 1, w, h))
                image = Image(frame, w, h)
                if self.lane_marking:  # the trainer's camera check refuses a uniform first frame
                    image.raw_data = bytes(4 * w) + image.raw_data[4 * w:]
                self.delivery.put(d["image"], sensor, image)
            elif sensor.type_id == "sensor.other.collision" and frame in self.collide_at:
                self.delivery.put(d["collision"], sensor, CollisionEvent(frame))
            elif sensor.type_id == "sensor.other.lane_invasion":
                # Client-side in CARLA: computed in an on_tick callback from two snapshots.
                y0, y1 = old.get(ego.id, (0.0, 0.0))[1], ego.transform.location.y
                edges = [y + LANE_WIDTH / 2 for y in LANES_Y] + [y - LANE_WIDTH / 2 for y in (LANES_Y[0], ONCOMING_Y)]
                if any(min(y0, y1) < b <= max(y0, y1) for b in edges):
                    self.delivery.put(d["on_tick"], sensor, LaneInvasionEvent(frame))
        for callback in list(self.on_tick.values()):
            self.delivery.put(d["on_tick"], callback, snapshot)


class Delivery:
    """One thread that runs queued callbacks at their due time (in order of due time, then of queueing)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any, Any]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._pending = 0  # queued or running
        self._thread: threading.Thread | None = None

    def put(self, delay_s: float, target: Any, data: Any) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._order), target, data))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="fake-carla-streams")
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(timeout=None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, target, data = heapq.heappop(self._heap)
            callback = target.callback if isinstance(target, Sensor) else target
            try:
                if callback is not None:
                    callback(data)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def idle(self, timeout_s: float = 2.0) -> bool:
        """Wait until every queued callback has run (tests use it before reading what arrived)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout=timeout_s)


class TrafficManager:
    def __init__(self, server: FakeServer, port: int) -> None:
        self._server, self.port = server, port
        self._generation = server.generation
        self.synchronous = False
        self.seed: int | None = None
        self.registered: set[int] = set()  # vehicles it drives; forgotten when the episode changes

    def _alive(self) -> None:
        if self._generation != self._server.generation:
            raise ProcessAborted(f"the Traffic Manager on port {self.port} lost its server: the client aborts "
                                 "(terminate called after throwing carla::client::TimeoutException)")
        self._server.check()

    @property
    def broken(self) -> bool:
        return self._generation != self._server.generation

    @typed(mode_switch=bool)
    def set_synchronous_mode(self, mode_switch: bool = True) -> None:
        self._alive()
        self._server.calls.append(("tm.set_synchronous_mode", mode_switch))
        self.synchronous = mode_switch

    @typed(value=int)
    def set_random_device_seed(self, value: int) -> None:
        self._alive()
        self._server.calls.append(("tm.set_random_device_seed", value))
        self.seed = value

    def get_port(self) -> int:
        return self.port


class World:
    def __init__(self, server: FakeServer, module: "FakeCarlaModule") -> None:
        self._server, self._module = server, module

    def get_settings(self) -> WorldSettings:
        self._server.check()
        return self._server.settings.copy()

    @typed(settings=WorldSettings, seconds=float)
    def apply_settings(self, settings: WorldSettings, seconds: float = 0.0) -> int:
        self._server.check()
        self._server.calls.append(("apply_settings", settings.synchronous_mode, settings.fixed_delta_seconds,
                                   settings.no_rendering_mode))
        self._server.settings = settings.copy()
        return self._server.frame

    def get_map(self) -> Map:
        self._server.check()
        return Map(self._server.town, self._server.lanes)

    def get_snapshot(self) -> WorldSnapshot:
        return WorldSnapshot(self._server.frame, self._server.elapsed_s)

    def set_weather(self, weather: WeatherParameters) -> None:
        self._server.check()
        self._server.calls.append(("set_weather", weather.name))
        self._server.weather = weather

    def get_blueprint_library(self) -> BlueprintLibrary:
        self._server.check()
        return BlueprintLibrary()

    @typed(blueprint=ActorBlueprint, transform=Transform, attach_to=(Actor, type(None)))
    def spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None) -> Actor:
        self._server.check()
        self._server.calls.append(("spawn_actor", blueprint.id))
        return self._server.spawn(blueprint, transform, attach_to)

    @typed(blueprint=ActorBlueprint, transform=Transform, attach_to=(Actor, type(None)))
    def try_spawn_actor(self, blueprint: ActorBlueprint, transform: Transform,
                        attach_to: Actor | None = None) -> Actor | None:
        self._server.check()
        self._server.calls.append(("try_spawn_actor", blueprint.id, transform.location.x, transform.location.y))
        if blueprint.id.startswith("vehicle.") and self._server.blocked(transform):
            return None
        return self._server.spawn(blueprint, transform, attach_to)

    @typed(actor_ids=list)
    def get_actors(self, actor_ids: list[int] | None = None) -> ActorList:
        """The actors the client knows of (registry and snapshot); asks the server only about missing ones."""
        self._server.check()
        actors = self._server.actors
        if actor_ids is None:  # the map's traffic light is an actor too
            return ActorList([*actors.values(), self._server.traffic_light])
        for i in actor_ids:
            if not _accepts(int, i):
                raise ArgumentError(f"World.get_actors: actor id {i!r} is {type(i).__name__}, not int")
        return ActorList([actors[i] for i in actor_ids if i in actors])

    def on_tick(self, callback: Callable[[WorldSnapshot], None]) -> int:
        callback_id = next(self._server._callback_ids)
        self._server.on_tick[callback_id] = callback
        return callback_id

    @typed(callback_id=int)
    def remove_on_tick(self, callback_id: int) -> None:
        self._server.on_tick.pop(callback_id, None)

    @typed(seconds=float)
    def tick(self, seconds: float = 0.0) -> int:
        server = self._server
        server.check()
        server.calls.append(("tick", seconds))
        for tm in self._module.traffic_managers.values():
            if tm.broken and tm.synchronous:
                tm._alive()  # its worker thread ticks with the world: the process aborts
        if server.timeouts_on_tick > 0:
            server.timeouts_on_tick -= 1
            raise RuntimeError(f"time-out of {int(seconds * 1000)}ms while waiting for the simulator")
        # Asynchronous mode: the server ticks on its own clock and the real client waits for that next frame.
        server.tick(server.settings.fixed_delta_seconds or 0.05)
        if not server.streaming:  # the tick cue went through, but the frame comes on the streaming port
            raise RuntimeError(f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the "
                               "simulator is ready and connected")
        return server.frame


# ------------------------------------------------------------------------------------------------- commands
FutureActor = 0  # an int on the real client: "the actor the command this hangs on spawned"


class SpawnActor:
    @typed(blueprint=ActorBlueprint, transform=Transform, parent=(Actor, int))
    def __init__(self, blueprint: ActorBlueprint, transform: Transform, parent: Any = None) -> None:
        self.blueprint, self.transform, self.parent = blueprint, transform, parent
        self.next: Any = None

    def then(self, command: Any) -> "SpawnActor":
        self.next = command
        return self


class SetAutopilot:
    @typed(actor=(Actor, int), enabled=bool, tm_port=int)
    def __init__(self, actor: Any, enabled: bool, tm_port: int = 8000) -> None:
        self.actor, self.enabled, self.port = actor, enabled, tm_port


class DestroyActor:
    @typed(actor=(Actor, int))
    def __init__(self, actor: Any) -> None:
        self.actor_id = actor.id if isinstance(actor, Actor) else actor


class Response:
    def __init__(self, actor_id: int = 0, error: str = "") -> None:
        self.actor_id, self.error = actor_id, error

    def has_error(self) -> bool:
        return bool(self.error)


# --------------------------------------------------------------------------------------------------- client
class Client:
    @typed(host=str, port=int, worker_threads=int)
    def __init__(self, module: "FakeCarlaModule", host: str = "127.0.0.1", port: int = 2000,
                 worker_threads: int = 0) -> None:
        self._module, self._server, self.host, self.port = module, module.server, host, port
        self._server.calls.append(("Client", host, port))
        self._server.clients.append(self)

    @typed(seconds=float)
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
        return World(self._server, self._module)

    def get_available_maps(self) -> list[str]:
        self._server.check()
        return [f"/Game/Carla/Maps/{m}" for m in self._server.maps]

    @typed(map_name=str, reset_settings=bool)
    def load_world(self, map_name: str, reset_settings: bool = True) -> World:
        server = self._server
        server.check()
        server.calls.append(("load_world", map_name, server.timeout_s))
        if map_name not in server.maps:
            raise RuntimeError(f"map '{map_name}' not found")
        if server.new_map_failures > 0:  # the new episode did not show up within the time-out
            server.new_map_failures -= 1
            raise RuntimeError(NEW_MAP_FAILED)
        server.town, server.actors, server.snapshot = map_name, {}, {}
        server.episode += 1
        for tm in server.traffic_managers:  # TrafficManagerLocal::Reset on an episode change: registrations go
            if not tm.broken:
                tm.registered.clear()
        if reset_settings:
            server.settings = WorldSettings()
        return World(server, self._module)

    @typed(port=int)
    def get_trafficmanager(self, port: int = 8000) -> TrafficManager:
        """The process's Traffic Manager for ``port``: made once, then the same one, as TrafficManager::GetTM."""
        self._server.check()
        self._server.calls.append(("get_trafficmanager", port))
        tms = self._module.traffic_managers
        if port not in tms:
            if port in self._server.host_ports_in_use:  # TrafficManagerServer binds the port on every interface
                raise RuntimeError(TM_BIND_ERROR)
            tms[port] = TrafficManager(self._server, port)
            self._server.traffic_managers.append(tms[port])
        return tms[port]

    @typed(do_tick=bool)
    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[Response]:
        server = self._server
        server.check()
        commands = list(commands)
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
            if isinstance(command.next, SetAutopilot) and command.next.actor == FutureActor:
                actor.autopilot_port = command.next.port if command.next.enabled else None
                tm = self._module.traffic_managers.get(command.next.port)
                if tm is not None and command.next.enabled:
                    tm.registered.add(actor.id)
            responses.append(Response(actor.id))
        return responses


class FakeCarlaModule:
    """Stands in for ``import carla`` in one process: the classes above, ``Client`` bound to one
    :class:`FakeServer`, and the process's Traffic Managers (one per port)."""

    Location, Rotation, Transform, Vector3D, VehicleControl = Location, Rotation, Transform, Vector3D, VehicleControl
    WorldSettings, WeatherParameters, LaneType = WorldSettings, WeatherParameters, LaneType
    TrafficLightState = TrafficLightState
    command = SimpleNamespace(SpawnActor=SpawnActor, SetAutopilot=SetAutopilot, DestroyActor=DestroyActor,
                              FutureActor=FutureActor)

    def __init__(self, town: str = "Town01", server: FakeServer | None = None) -> None:
        self.server = server or FakeServer(town)
        self.traffic_managers: dict[int, TrafficManager] = {}

    def Client(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> Client:  # noqa: N802
        return Client(self, host, port, worker_threads)


# ------------------------------------------------------------------------------------------ worker processes
class InlineSupervisor:
    """The session's Supervisor (av_td3.envs.carla.env) in an :class:`InlineWorker`: back-off waits are recorded in
    ``waits`` (no time passes), progress reports counted in ``reports``, and the trainer's ``stop_pending`` is read
    directly (the process worker passes it on through an event)."""

    def __init__(self, stop_pending: Callable[[], bool]) -> None:
        self._stop_pending = stop_pending
        self.waits: list[float] = []
        self.reports = 0

    def stop_pending(self) -> bool:
        return self._stop_pending()

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def alive(self) -> None:
        self.reports += 1


class InlineWorker:
    """Stands in for av_td3.envs.carla.worker.ProcessWorker: the session runs in this process, on a fresh
    ``FakeCarlaModule`` (a fresh "process": no Traffic Manager yet) sharing ``server``. A :class:`ProcessAborted`
    ends the "process": this call and every later one raise the worker's ``WorkerDied``. ``supervisor`` is the
    session's :class:`InlineSupervisor`."""

    def __init__(self, server: FakeServer, cfg: Any, seed: int | None,
                 stop_pending: Callable[[], bool] = lambda: False) -> None:
        from av_td3.envs.carla.env import CarlaSession
        from av_td3.envs.carla.worker import WorkerDied

        self._died = WorkerDied
        self.module = FakeCarlaModule(server=server)
        self.alive = True
        self.supervisor = InlineSupervisor(stop_pending)
        try:
            self.env = CarlaSession(cfg, seed, carla_module=self.module, supervisor=self.supervisor)
        except ProcessAborted as err:
            raise WorkerDied(f"the CARLA worker process aborted: {err}") from None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.alive:
            raise self._died("the CARLA worker process has ended")
        try:
            return getattr(self.env, method)(*args, **kwargs)
        except ProcessAborted as err:
            self.alive = False
            raise self._died(f"the CARLA worker process aborted: {err}") from None

    def kill(self) -> None:
        self.alive = False


def inline_workers(server: FakeServer) -> Callable[[Any, Any, Any], InlineWorker]:
    """A worker factory for ``CarlaDrivingEnv(start=...)`` (or to patch ``worker.start_worker`` with)."""
    started: list[InlineWorker] = []

    def start(cfg: Any, seed: int | None, stop_pending: Callable[[], bool] = lambda: False) -> InlineWorker:
        worker = InlineWorker(server, cfg, seed, stop_pending)
        started.append(worker)
        return worker

    start.started = started  # type: ignore[attr-defined]
    return start
