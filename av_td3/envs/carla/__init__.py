"""CARLA 0.9.16 backend of the driving-env contract in :mod:`av_td3.envs.base`.

- :mod:`.env`: :class:`CarlaDrivingEnv`, the session with one server: connection, world set-up, the ego and its
  sensors, ticks, resets and reconnects.
- :mod:`.sensors`: the sensor inbox that hands a tick's camera image and its frame-stamped events to the step.
- :mod:`.traffic`: reproducible NPC traffic (blueprint choice, seeded spawning with fallback points).
- :mod:`.route`: the route along the map's waypoints and the frame conversions.
- :mod:`.ports`: claims on a server and a Traffic Manager port, so two runs on one server are warned about.

The ``carla`` package is imported when an env is built, never at ``import av_td3`` time.
"""

from av_td3.envs.carla.env import CarlaDrivingEnv

__all__ = ["CarlaDrivingEnv"]
