"""The traffic light ahead on the route, as two entries appended to the state vector (``env.carla.traffic_light``).

``[light_distance m, light_colour]``: the distance along the route from the ego to the stop line of the next
traffic light whose stop line lies on the route (its ``get_stop_waypoints()`` within the lane's half width of the
route's centre line), and that light's colour as the need to stop: red 1, yellow 0.5, green (or off, unknown) 0.
With no such light within :data:`LIGHT_RANGE_M`, or ``env.carla.traffic_light=false``, they read
:data:`NO_LIGHT`. The stop lines are read from the server once per scene (lights are part of the map) and placed
on each route once; a step only reads the lights' states from the client's snapshot of the last tick.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from av_td3.envs.base import LEAD_RANGE_M
from av_td3.envs.carla.route import Route, xy

LIGHT_RANGE_M = LEAD_RANGE_M  # as far as the lead vehicle is looked for (the CARLA declaration's state tail agrees)
NO_LIGHT = (LIGHT_RANGE_M, 0.0)


def stop_lines(world: Any) -> list[tuple[np.ndarray, Any]]:
    """(stop-line point in our world frame, its light) for every stop waypoint of every traffic light of the
    loaded map. Asks the server (call it once per scene)."""
    return [(xy(w.transform.location), light) for light in world.get_actors().filter("traffic.traffic_light")
            for w in light.get_stop_waypoints()]


def colour(state: Any, carla: Any) -> float:
    """A ``carla.TrafficLightState`` as the need to stop: red 1, yellow 0.5, anything else 0."""
    return {carla.TrafficLightState.Red: 1.0, carla.TrafficLightState.Yellow: 0.5}.get(state, 0.0)


class LightsAhead:
    """The stop lines that lie on one route (arc length along it, light), in order along it."""

    def __init__(self, lines: list[tuple[float, Any]]) -> None:
        self._lines = sorted(lines, key=lambda item: item[0])

    @classmethod
    def on_route(cls, route: Route, lines: list[tuple[np.ndarray, Any]]) -> "LightsAhead":
        """The stop lines of ``lines`` (from :func:`stop_lines`) within the lane's half width of ``route``."""
        if not lines:
            return cls([])
        s, distance = route.locate(np.array([p for p, _ in lines]))
        # Within the lane: the stop lines of the other lanes at the same junction lie a lane width away.
        half = np.interp(s, route.s, route.half_width)
        return cls([(float(si), light) for si, d, h, (_, light) in zip(s, distance, half, lines) if d < h])

    def ahead(self, s: float, carla: Any) -> tuple[float, float]:
        """(metres from arc length ``s`` to the next stop line, its light's colour), or :data:`NO_LIGHT`. A stop
        line the car has reached is behind it: the next one counts."""
        for line_s, light in self._lines:
            if line_s > s:
                gap = line_s - s
                return (gap, colour(light.get_state(), carla)) if gap <= LIGHT_RANGE_M else NO_LIGHT
        return NO_LIGHT
