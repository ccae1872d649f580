"""Episode rules beyond collisions and leaving the road, after CARLA-Roach's terminal conditions.

Each rule ends the episode as terminated (no bootstrap: the future it cuts off is the penalty), names itself in
``info["termination"]`` and costs its own reward term (``env.reward.<rule>_penalty``, in
``info["reward_components"]["<rule>"]``); each has its ``env.carla.*`` key, and ``null`` (``False`` for the red
light) turns it off:

- ``route_deviation``: the car is more than ``env.carla.route_deviation_m`` metres sideways from the route's lane
  centre (it took another branch at a junction, or drives a lane beyond the next one);
- ``wrong_way``: it moves (faster than ``MOVING_M_S``) with its heading more than ``env.carla.wrong_way_deg``
  degrees off the route's direction, or it is in a lane whose own direction is that far off the route's (the
  oncoming lane, whatever way the car points; outside junctions, where lanes cross). The second test is Roach's
  wrong-lane test (OutsideRouteLane compares lane directions); it catches a car cruising in the oncoming lane,
  whose centre lies only one lane width (3.5 m in the double, about 3.5-4 m in CARLA's towns) off the route;
- ``blocked``: its speed has stayed below ``STILL_M_S`` for ``env.carla.blocked_s`` seconds;
- ``red_light``: it enters a junction while the light that governs it (the one whose trigger area in front of the
  stop line it is in, or last left) is red, and was red at the step before (``env.carla.red_light``).
"""

from __future__ import annotations

import math

from av_td3.config import CarlaConfig
from av_td3.envs.base import DrivingSignals

MOVING_M_S = 1.0  # slower than this, a heading against the route is manoeuvring, not wrong-way driving
STILL_M_S = 0.1  # slower than this counts as standing still for `blocked`


class EpisodeRules:
    """The rules above for one episode; :meth:`check` is called once per step with that step's measurements."""

    def __init__(self, cfg: CarlaConfig, dt: float) -> None:
        self.cfg, self.dt = cfg, dt
        self.reset()

    def reset(self) -> None:
        self._still_s = 0.0  # seconds below STILL_M_S in a row
        self._red_before_junction = False  # at the last step: the governing light red, the car not yet in the junction

    def check(self, s: DrivingSignals, light_red: bool, in_junction: bool, lane_error: float | None = None) -> str:
        """The name of the rule this step broke, or "". ``light_red``: the light that governs the car (the one
        whose trigger area it is in, or last left before the junction) is red now; ``in_junction``: its lane
        position is inside a junction; ``lane_error``: radians between the direction of the lane the car is in and
        the route's, None off the road or in a junction."""
        c = self.cfg
        self._still_s = self._still_s + self.dt if abs(s.speed) < STILL_M_S else 0.0
        ran_red = self._red_before_junction and light_red and in_junction
        self._red_before_junction = light_red and not in_junction
        if c.route_deviation_m is not None and abs(s.lateral_offset) > c.route_deviation_m:
            return "route_deviation"
        if c.wrong_way_deg is not None:
            limit = math.radians(c.wrong_way_deg)
            if ((abs(s.speed) > MOVING_M_S and abs(s.heading_error) > limit)
                    or (lane_error is not None and abs(lane_error) > limit)):
                return "wrong_way"
        if c.red_light and ran_red:
            return "red_light"
        if c.blocked_s is not None and self._still_s >= c.blocked_s - 1e-9:
            return "blocked"
        return ""
