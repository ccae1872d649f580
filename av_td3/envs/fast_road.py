"""Vectorised versions of highway-env's two per-vehicle road queries, the embedded simulator's hot spots.

Every sub-step, each of highway-env's vehicles asks ``RoadNetwork.get_closest_lane_index`` (a Python loop over
every lane of the network) and ``Road.neighbour_vehicles`` (a Python loop over every vehicle): with 20 NPCs that
is ~70% of a step. Here both are the same computations on numpy arrays — same lane order, same distances, same
on-lane test — so they return what highway-env's own methods return (``tests/test_env_highway.py`` compares them
on random positions). Vehicles move only in ``Road.step``, so :class:`BatchedRoadStep` looks up the lanes of all
of them in one batch per sub-step, and :class:`FastNeighbours` computes the coordinates of every vehicle on every
lane once per sub-step for all the queries that follow. :func:`speed_up` installs them on one road; lanes other
than straight and circular ones (and roads with obstacles, landmarks or recorded histories) keep highway-env's
own methods.
"""

from __future__ import annotations

import numpy as np
from highway_env.road.lane import AbstractLane, CircularLane, StraightLane
from highway_env.road.road import Road, RoadNetwork

LaneIndex = tuple[str, str, int]


def _wrap_to_pi(x: np.ndarray) -> np.ndarray:
    return ((x + np.pi) % (2 * np.pi)) - np.pi


class LaneTable:
    """The lanes of a network as arrays, for the local coordinates of one point on all of them at once."""

    def __init__(self, lanes: list[AbstractLane]) -> None:
        n = len(lanes)
        self.lanes = lanes
        self.circular = np.array([isinstance(lane, CircularLane) for lane in lanes])
        self.start = np.zeros((n, 2))
        self.direction = np.zeros((n, 2))
        self.lateral = np.zeros((n, 2))
        self.heading = np.zeros(n)
        self.center = np.zeros((n, 2))
        self.radius = np.ones(n)  # 1, not 0, on straight lanes: their circular formulas are computed and unused
        self.phase = np.zeros(n)
        self.turn = np.ones(n)  # +1 clockwise, -1 counter-clockwise (highway-env's CircularLane.direction)
        self.length = np.array([lane.length for lane in lanes], dtype=float)
        self.half_width = np.array([lane.width / 2 for lane in lanes], dtype=float)
        for i, lane in enumerate(lanes):
            if isinstance(lane, CircularLane):
                self.center[i], self.radius[i] = lane.center, lane.radius
                self.phase[i], self.turn[i] = lane.start_phase, lane.direction
            else:
                self.start[i], self.direction[i] = lane.start, lane.direction
                self.lateral[i], self.heading[i] = lane.direction_lateral, lane.heading

    @staticmethod
    def supports(lanes: list[AbstractLane]) -> bool:
        # exact types: subclasses (SineLane) override the geometry
        return all(type(lane) in (StraightLane, CircularLane) for lane in lanes)

    def local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(longitudinal, lateral) of ``points`` [P, 2] on every lane: two arrays [lanes, P]."""
        x, y = points[None, :, 0], points[None, :, 1]
        if not self.circular.any():
            return self._straight(x, y)
        if self.circular.all():
            return self._circle(x, y)
        (s1, r1), (s2, r2), circular = self._straight(x, y), self._circle(x, y), self.circular[:, None]
        return np.where(circular, s2, s1), np.where(circular, r2, r1)

    def _straight(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.start[:, 0, None], y - self.start[:, 1, None]
        return (dx * self.direction[:, 0, None] + dy * self.direction[:, 1, None],
                dx * self.lateral[:, 0, None] + dy * self.lateral[:, 1, None])

    def _circle(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.center[:, 0, None], y - self.center[:, 1, None]
        phase, turn, radius = self.phase[:, None], self.turn[:, None], self.radius[:, None]
        phi = phase + _wrap_to_pi(np.arctan2(dy, dx) - phase)
        return turn * (phi - phase) * radius, turn * (radius - np.hypot(dx, dy))

    def heading_at(self, s: np.ndarray) -> np.ndarray:
        """Lane heading at longitudinal ``s`` [lanes, P]."""
        turn, radius = self.turn[:, None], self.radius[:, None]
        circle = turn * s / radius + self.phase[:, None] + np.pi / 2 * turn
        return np.where(self.circular[:, None], circle, self.heading[:, None])


class FastLaneLookup:
    """``RoadNetwork.get_closest_lane_index`` over all lanes at once (same order, distance and heading weight)."""

    def __init__(self, network: RoadNetwork) -> None:
        self.indexes: list[LaneIndex] = []
        lanes: list[AbstractLane] = []
        for _from, to_dict in network.graph.items():
            for _to, to_lanes in to_dict.items():
                for _id, lane in enumerate(to_lanes):
                    self.indexes.append((_from, _to, _id))
                    lanes.append(lane)
        self.table = LaneTable(lanes)

    def __call__(self, position: np.ndarray, heading: float | None = None) -> LaneIndex:
        headings = None if heading is None else np.array([heading], dtype=float)
        return self.batch(np.asarray(position, dtype=float)[None, :], headings)[0]

    def batch(self, positions: np.ndarray, headings: np.ndarray | None = None) -> list[LaneIndex]:
        """The closest lane of each of ``positions`` [P, 2] (with ``headings`` [P]: weighted as highway-env does)."""
        s, r = self.table.local(positions)
        distance = np.abs(r) + np.maximum(s - self.table.length[:, None], 0) + np.maximum(-s, 0)
        if headings is not None:
            distance = distance + np.abs(_wrap_to_pi(headings[None, :] - self.table.heading_at(s)))
        return [self.indexes[i] for i in distance.argmin(axis=0)]


class BatchedRoadStep:
    """``Road.step`` with the lane lookup of every vehicle done in one batch once all of them have moved.

    highway-env's ``Vehicle.step`` moves one vehicle and then looks up its lane (``on_state_update``); the
    move reads only that vehicle's own state, so looking all lanes up after the loop gives each vehicle the same
    lane, and the collision checks that follow read positions only. During the loop the per-vehicle lookup
    answers a placeholder lane that the batch then overwrites.
    """

    def __init__(self, road: Road, lookup: FastLaneLookup, neighbours: "FastNeighbours") -> None:
        self.road = road
        self.lookup = lookup
        self.neighbours = neighbours

    def _placeholder(self, position: np.ndarray, heading: float | None = None) -> LaneIndex:
        return self.lookup.indexes[0]

    def __call__(self, dt: float) -> None:
        road, network = self.road, self.road.network
        vehicles = road.vehicles
        network.get_closest_lane_index = self._placeholder
        try:
            for vehicle in vehicles:
                vehicle.step(dt)
        finally:
            network.get_closest_lane_index = self.lookup
            self.neighbours.moved()
        if vehicles:
            lanes = self.lookup.batch(np.array([v.position for v in vehicles], dtype=float),
                                      np.array([v.heading for v in vehicles], dtype=float))
            for vehicle, lane_index in zip(vehicles, lanes):
                vehicle.lane_index, vehicle.lane = lane_index, network.get_lane(lane_index)
        for i, vehicle in enumerate(vehicles):  # each pair once (speed_up installs this only without objects)
            for other in vehicles[i + 1:]:
                vehicle.handle_collisions(other, dt)


class FastNeighbours:
    """``Road.neighbour_vehicles``: the nearest vehicle ahead and behind on a lane (and, with
    ``neighbour_vehicles_connected_lanes``, on the lanes connected to it).

    Vehicles move only in ``Road.step``, and between two steps every vehicle asks about its lanes: so the
    coordinates of all vehicles on all lanes are computed once per step (:meth:`moved` marks a new step) and each
    query only picks its lanes' rows. The cache is also dropped when the road's vehicle list changes."""

    def __init__(self, road: Road, lookup: FastLaneLookup) -> None:
        self.road = road
        self.table = lookup.table  # every lane of the network
        self._row = {id(lane): i for i, lane in enumerate(lookup.table.lanes)}
        self._searches: dict[LaneIndex, tuple[np.ndarray, np.ndarray]] = {}  # the road's lanes never change
        self._step = 0
        # per sub-step: the cache key, each vehicle's index, all vehicles' (s, r) on every lane [lanes, vehicles]
        # and, per queried lane, (s in that lane's frame, on a searched lane) of every vehicle
        self._key: tuple | None = None
        self._index: dict[int, int] = {}
        self._s = self._r = np.zeros((0, 0))
        self._lanes: dict[LaneIndex, tuple[np.ndarray, np.ndarray]] = {}

    def moved(self) -> None:
        """The vehicles have moved: coordinates computed before are stale."""
        self._step += 1

    def _search(self, lane_index: LaneIndex) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the lanes searched for a vehicle on ``lane_index`` and the offset of each into that lane's s."""
        if lane_index not in self._searches:
            network = self.road.network
            lane = network.get_lane(lane_index)
            search: list[tuple[AbstractLane, float]] = [(lane, 0.0)]
            if self.road.neighbour_vehicles_connected_lanes:
                _from, _to, _id = lane_index
                for next_lanes in network.graph.get(_to, {}).values():
                    if next_lanes:
                        search.append((next_lanes[_id] if _id < len(next_lanes) else next_lanes[0], lane.length))
                for to_dict in network.graph.values():
                    prev_lanes = to_dict.get(_from)
                    if prev_lanes:
                        prev_lane = prev_lanes[_id] if _id < len(prev_lanes) else prev_lanes[0]
                        search.append((prev_lane, -prev_lane.length))
            self._searches[lane_index] = (np.array([self._row[id(lane)] for lane, _ in search]),
                                          np.array([offset for _, offset in search]))
        return self._searches[lane_index]

    def _on_lanes(self, lane_index: LaneIndex) -> tuple[np.ndarray, np.ndarray]:
        """For every vehicle: its s in ``lane_index``'s frame and whether it is on one of the searched lanes."""
        vehicles = self.road.vehicles
        key = (self._step, id(vehicles), len(vehicles))  # the list changes only between steps
        if key != self._key:
            self._key, self._lanes = key, {}
            self._index = {id(v): i for i, v in enumerate(vehicles)}
            self._s, self._r = self.table.local(np.array([v.position for v in vehicles], dtype=float))
        if lane_index not in self._lanes:
            rows, offsets = self._search(lane_index)
            s_v, r_v = self._s[rows], self._r[rows]
            # AbstractLane.on_lane(margin=1) on each searched lane; a vehicle counts on the first lane it is on
            on = ((np.abs(r_v) <= self.table.half_width[rows, None] + 1) & (-AbstractLane.VEHICLE_LENGTH <= s_v)
                  & (s_v < self.table.length[rows, None] + AbstractLane.VEHICLE_LENGTH))
            first = on.argmax(axis=0)
            self._lanes[lane_index] = (s_v[first, np.arange(len(vehicles))] + offsets[first], on.any(axis=0))
        return self._lanes[lane_index]

    def __call__(self, vehicle, lane_index: LaneIndex | None = None):
        lane_index = lane_index or vehicle.lane_index
        if not lane_index or not self.road.vehicles:
            return None, None
        s_match, matched = self._on_lanes(lane_index)
        others = matched.copy()
        me = self._index.get(id(vehicle))
        if me is None:  # not one of the road's vehicles
            s = self.road.network.get_lane(lane_index).local_coordinates(vehicle.position)[0]
        else:  # its own s on the lane (the first lane searched), as computed for all vehicles
            s = self._s[self._search(lane_index)[0][0], me]
            others[me] = False
        vehicles = self.road.vehicles
        v_front = v_rear = None
        ahead = np.flatnonzero(others & (s_match >= s))
        if ahead.size:  # of two at the same distance, highway-env's loop keeps the later one ahead...
            v_front = vehicles[ahead[s_match[ahead] == s_match[ahead].min()][-1]]
        behind = np.flatnonzero(others & (s_match < s))
        if behind.size:  # ...and the earlier one behind
            v_rear = vehicles[behind[s_match[behind] == s_match[behind].max()][0]]
        return v_front, v_rear


def speed_up(road: Road) -> bool:
    """Install the vectorised queries on ``road`` (a fresh one is built at every reset); False when its lanes or
    objects are of kinds they do not cover, and highway-env's own methods stay."""
    network = road.network
    lanes = [lane for to_dict in network.graph.values() for to_lanes in to_dict.values() for lane in to_lanes]
    if road.objects or road.record_history or not LaneTable.supports(lanes):
        return False
    lookup = FastLaneLookup(network)
    network.get_closest_lane_index = lookup
    road.neighbour_vehicles = FastNeighbours(road, lookup)
    road.step = BatchedRoadStep(road, lookup, road.neighbour_vehicles)
    return True
