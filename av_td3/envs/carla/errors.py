"""What an error of the CARLA client means and what to do about it: the one place that reads the client's words.

The carla 0.9.16 wheel raises a plain ``RuntimeError`` for everything that goes wrong on the server side, so its
message is all there is to go on. The texts below were read from the wheel's ``libcarla`` and from LibCarla's
source; each is answered in one of two ways (:func:`classify`):

- ``LOST``: the server is gone, stalled, restarting or still loading. The session reconnects in place
  (``env.carla.max_reconnects``), then the trainer's side starts fresh worker processes
  (``env.carla.server_lost_minutes``); at start the run stops at once with :func:`diagnose`'s message.
- ``UNUSABLE``: the server answers but cannot be used as configured (a Traffic Manager port taken by another
  program, a start occupied by another client's car, a map the server lacks). Retrying cannot help: the run
  checkpoints and stops with a message naming the cause and the fix (:class:`SimulatorUnusableError`).

Anything else (a Boost.Python ``ArgumentError``, an error of this code) is a bug and is raised as it is.
"""

from __future__ import annotations

from av_td3.config import CarlaConfig, ConfigError
from av_td3.envs.base import SimulatorUnusableError

LOST = "lost"
UNUSABLE = "unusable"

# carla::client::TimeoutException: "time-out of 10000ms while waiting for the simulator, make sure the simulator is
# ready and connected to host:port" (and the SensorInbox's own "time-out of 2s waiting for the camera image ...").
TIME_OUT = "time-out of"
# boost::asio, when env.carla.host does not resolve: "resolve: Host not found (authoritative)".
RESOLVE = "resolve"
# Client::LoadWorld: the new map's episode did not appear within the time-out (a cold server loading a town).
NEW_MAP = "failed to connect to newly created map"
# EpisodeProxy::Lock: an actor of an episode that is gone (the server restarted, or the map was reloaded).
DESTROYED_ACTOR = "trying to operate on a destroyed actor"
# TrafficManagerServer: its RPC server cannot bind the port (another program or job holds it on this machine).
TM_BIND = "failed to create because of bind error"

START_SERVER = "docker compose -f docker/compose.yaml up -d carla"


class NoSensorDataError(RuntimeError):
    """The server answers on its RPC port, but what the env needs from its streaming side (the tick's frame, the
    camera's images) does not arrive. The message names what is missing and what to check; handled as ``LOST``
    (a server still starting up sends nothing yet)."""


def classify(err: BaseException) -> str:
    """``LOST``, ``UNUSABLE`` or "" (not the server's doing: raise it as it is) for an error met on any path:
    start, step, reset, reconnect, restart."""
    if isinstance(err, (SimulatorUnusableError, ConfigError)):
        return UNUSABLE
    if isinstance(err, NoSensorDataError):
        return LOST
    if not isinstance(err, RuntimeError):
        return ""
    text = str(err)
    if TM_BIND in text:
        return UNUSABLE
    if any(words in text for words in (TIME_OUT, RESOLVE, NEW_MAP, DESTROYED_ACTOR)):
        return LOST
    return ""


def unusable(err: BaseException, cfg: CarlaConfig) -> SimulatorUnusableError:
    """The :class:`SimulatorUnusableError` for an error :func:`classify` calls ``UNUSABLE``: its cause and fix."""
    if isinstance(err, SimulatorUnusableError):
        return err
    if TM_BIND in str(err):
        return SimulatorUnusableError(
            f"the Traffic Manager cannot listen on port {cfg.traffic_manager_port()} (env.carla.tm_port): another "
            f"program or av-td3 job on this machine holds it ({err}). Give every job its own port: "
            "env.carla.tm_port=<a free port>, or leave it out to use env.carla.port + 6000 (see docs/carla.md, "
            "'Sweeps').")
    if isinstance(err, ConfigError):  # at start a ConfigError stops the run as it is; here the server changed
        return SimulatorUnusableError(f"the CARLA server at {cfg.host}:{cfg.port} changed under the run: {err}")
    return SimulatorUnusableError(f"the CARLA server at {cfg.host}:{cfg.port} cannot be used as configured: {err}")


def diagnose(err: BaseException, cfg: CarlaConfig) -> str:
    """What a ``LOST`` error at start means, for the one line the run stops with."""
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(err, NoSensorDataError):
        return f"the CARLA server at {where} answers, but {err}"
    if NEW_MAP in str(err):
        return (f"the CARLA server at {where} did not finish loading the map ({err}): a server that has just started "
                "can take minutes. Wait until `docker compose -f docker/compose.yaml ps` says healthy and rerun, or "
                "keep the loaded town with env.carla.load_world=false.")
    if DESTROYED_ACTOR in str(err):
        return (f"the CARLA server at {where} restarted or reloaded its map while this run took it over ({err}). "
                "Make sure no other client drives it, and rerun.")
    return (f"cannot reach the CARLA server at {where} ({err}). Start one with `{START_SERVER}` "
            f"(or ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={cfg.port}), wait until it listens, or point "
            "env.carla.host/env.carla.port at a running server.")
