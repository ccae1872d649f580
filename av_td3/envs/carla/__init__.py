"""CARLA 0.9.16 backend of the driving-env contract in :mod:`av_td3.envs.base`.

- :mod:`.worker`: :class:`CarlaDrivingEnv`, what the trainer uses: a session in its own worker process, restarted
  (a fresh client and Traffic Manager) when the server is lost.
- :mod:`.env`: :class:`CarlaSession`, the env on one server in this process: ticks, observations, resets and
  in-process reconnects after a stall.
- :mod:`.takeover`: the session's start-up half: connection, world take-over, the ego and its sensors.
- :mod:`.sensors`: the sensor inbox that hands a tick's camera image and its frame-stamped events to the step.
- :mod:`.lights`: the traffic light ahead on the route, for the state vector (``env.carla.traffic_light``).
- :mod:`.traffic`: reproducible NPC traffic (blueprint choice, seeded spawning with fallback points).
- :mod:`.route`: the route along the map's waypoints and the frame conversions.
- :mod:`.rules`: the episode rules after CARLA-Roach (route deviation, wrong way, blocked, red light).
- :mod:`.ports`: claims on a server and a Traffic Manager port, so two runs on one server are warned about.

Its keys are ``env.carla.*``; what the backend declares about itself (one world per server, so evaluation shares
the training env; its decision interval, state tail and episode rules) is ``av_td3.envs.backends.CARLA``. The
``carla`` package is imported when a session is built (in the worker), never at ``import av_td3`` time.
"""

from av_td3.envs.carla.env import CarlaSession
from av_td3.envs.carla.worker import CarlaDrivingEnv

__all__ = ["CarlaDrivingEnv", "CarlaSession"]
