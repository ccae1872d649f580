"""The ego's route along the map's own waypoints, and CARLA's frame conversions.

CARLA's world is left-handed (y right, yaw clockwise seen from above); everything here is in our right-handed
world frame (y flipped), and everything handed to the agent is then converted to the contract's ego frame.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def xy(location: Any) -> np.ndarray:
    """CARLA location → our right-handed world frame (y flipped), metres."""
    return np.array([location.x, -location.y])


def heading(rotation: Any) -> float:
    """CARLA yaw (degrees, clockwise seen from above) → heading in radians, counter-clockwise."""
    return -math.radians(rotation.yaw)


class Route:
    """Lane-centre polyline in our right-handed world frame, with its arc length (metres)."""

    def __init__(self, points: np.ndarray, half_width: np.ndarray) -> None:
        self.xy = np.asarray(points, dtype=np.float64)
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

    def locate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(arc length [N], distance from the centre line [N], metres) of the nearest route point to each of
        ``points`` [N, 2], over the whole route (stateless, unlike :meth:`project`)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 1, 2)
        t = np.clip(((p - self.xy[:-1]) * self.seg).sum(-1) / self.seg_len ** 2, 0.0, 1.0)  # [N, S]
        distance = np.hypot(*np.moveaxis(self.xy[:-1] + t[..., None] * self.seg - p, -1, 0))
        k = np.argmin(distance, axis=1)
        rows = np.arange(len(p))
        return self.s[k] + t[rows, k] * self.seg_len[k], distance[rows, k]

    def points_ahead(self, s: float, n: int, spacing: float) -> np.ndarray:
        """The ``n`` lane-centre points ``spacing``, 2 * ``spacing``, ... metres further along the route."""
        return self.points_at(s + spacing * np.arange(1, n + 1))

    def points_at(self, ss: np.ndarray) -> np.ndarray:
        """Lane-centre points at arc lengths ``ss`` (held at the route's ends beyond them)."""
        return np.stack([np.interp(ss, self.s, self.xy[:, 0]), np.interp(ss, self.s, self.xy[:, 1])], axis=1)


def build_route(town_map: Any, start: Any, reach_m: float, spacing_m: float, rng: np.random.Generator) -> Route:
    """Follow the map's waypoints from the ``start`` transform for ``reach_m`` metres, ``spacing_m`` apart; at a
    junction a branch is drawn from ``rng``. Stops early at a dead end."""
    waypoint = town_map.get_waypoint(start.location)
    points, half = [xy(waypoint.transform.location)], [waypoint.lane_width / 2]
    travelled = 0.0
    while travelled < reach_m:
        following = waypoint.next(spacing_m)
        if not following:  # a dead end: the route (and the episode's goal) stops here
            break
        waypoint = following[int(rng.integers(len(following)))]
        points.append(xy(waypoint.transform.location))
        half.append(waypoint.lane_width / 2)
        travelled += spacing_m
    if len(points) < 2:
        raise RuntimeError(f"no road ahead of the spawn point at {start.location}")
    return Route(np.array(points), np.array(half))
