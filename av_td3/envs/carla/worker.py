"""Each CARLA simulator in its own worker process, restarted when its server is lost.

The CARLA client keeps one Traffic Manager per process and port (``TrafficManager::GetTM``). When the server
restarts, the next ``get_trafficmanager`` hands back the old one, bound to the dead connection, and its worker
thread aborts the whole process (carla#7597). So the trainer never talks to CARLA itself: :class:`CarlaDrivingEnv`
runs a :class:`~av_td3.envs.carla.env.CarlaSession` in a child process (the gymnasium vector-env worker model,
one env per worker) and forwards ``reset``/``step``/``close`` to it. When the worker dies, stops answering, or gives
up reconnecting (``SimulatorLostError`` after ``env.carla.max_reconnects``), the env kills it and starts a fresh
one — a fresh client and Traffic Manager — with back-off, ends the current episode as truncated on the last good
observation, and training goes on. When no worker can be started for ``env.carla.server_lost_minutes``, it raises
``SimulatorLostError``: the trainer checkpoints and exits non-zero with that message.

Deadlines: the worker reports progress (each tick, each reconnect attempt, a connection, a town loaded) through
the pipe, and the trainer kills it only after :func:`watchdog_s` of silence, a bound derived from the time-outs.
A stop signal pending in the trainer reaches the worker through a shared event: its reconnect loop ends at once
(its back-off wait is cut short) instead of loading the town inside the stop's grace period. The worker's log
records travel on the same pipe to the trainer's loggers, so its warnings are in the run's log.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import signal
import threading
import time
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

from av_td3.config import ConfigError, EnvConfig
from av_td3.envs.backends import CARLA
from av_td3.envs.base import (EnvUnavailableError, SimulatorLostError, StopRequested, action_space,
                              interrupted_info, observation_space)
from av_td3.envs.carla.errors import unusable

log = logging.getLogger(__name__)

# Restart back-off: 1 s, 2 s, 4 s, ... capped, within env.carla.server_lost_minutes.
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


class WorkerDied(RuntimeError):
    """The worker process ended, or stopped answering: its simulator connection is gone with it."""


class Worker(Protocol):
    """One CarlaSession somewhere: ``call`` runs one of its methods and returns the result or raises what it
    raised (:class:`WorkerDied` when the worker itself is gone); ``kill`` ends it without asking."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    def kill(self) -> None: ...


# (cfg, seed, stop_pending): stop_pending() is true once the trainer has a stop signal pending.
StartWorker = Callable[[EnvConfig, "int | None", Callable[[], bool]], Worker]
# Longest a restart back-off sleeps before it asks again whether a stop is pending.
STOP_POLL_S = 1.0


# ------------------------------------------------------------------------------------------- the process worker
def make_session(cfg: EnvConfig, seed: int | None, supervisor: Any) -> Any:
    """The worker's env: a CarlaSession on the real client, reporting to ``supervisor``."""
    from av_td3.envs.carla.env import CarlaSession

    return CarlaSession(cfg, seed, supervisor=supervisor)


class PipeSupervisor:
    """The session's supervisor in the worker process (:class:`~av_td3.envs.carla.env.Supervisor`): progress goes
    to the trainer as ``("alive", None)`` on the pipe; a stop is pending once the trainer has set ``stop`` (a
    ``multiprocessing.Event``), which also ends a back-off wait early."""

    def __init__(self, conn: Any, stop: Any) -> None:
        self._conn, self._stop = conn, stop

    def stop_pending(self) -> bool:
        return bool(self._stop.is_set())

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def alive(self) -> None:
        _send(self._conn, "alive", None)  # a trainer that is gone is noticed at the call's answer


# Ctrl-C, scancel and a cluster's preemption notice (SLURM's --signal, submitit's USR2) reach the whole process group.
# The trainer decides what happens: it checkpoints, then closes the worker, which gives the server back.
WORKER_IGNORES = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                       if hasattr(signal, name))


Factory = Callable[[EnvConfig, "int | None", Any], Any]  # (cfg, seed, supervisor) -> the worker's env


class _LockedConn:
    """The worker's end of the pipe, safe to send on from several threads: answers go from the main thread, log
    records also from the client's callback threads."""

    def __init__(self, conn: Any) -> None:
        self._conn, self._lock = conn, threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self._conn.send(message)

    def recv(self) -> Any:
        return self._conn.recv()


class PipeLogHandler(logging.handlers.QueueHandler):
    """Sends the worker's log records to the trainer as ``("log", record)``, where they are handled by the logger
    of the same name and so reach the run's log. ``prepare`` (QueueHandler's) formats the message and drops its
    arguments and traceback object, so a record always pickles."""

    def __init__(self, conn: Any) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no queue: enqueue sends on the pipe
        self._conn = conn

    def enqueue(self, record: logging.LogRecord) -> None:
        _send(self._conn, "log", record)


def _serve(conn: Any, factory: Factory, cfg: EnvConfig, seed: int | None, stop: Any, level: int) -> None:
    """The worker's main loop: build the env with ``factory``, then answer (method, args, kwargs) until ``close``,
    or until the trainer's end of the pipe is gone (read or written): then close the env, as for ``close``.
    ``stop`` is the event the trainer sets when a stop is pending; records at ``level`` and above are logged to
    the trainer (a spawned process has no logging set up of its own)."""
    for stop_signal in WORKER_IGNORES:
        signal.signal(stop_signal, signal.SIG_IGN)
    conn = _LockedConn(conn)
    root = logging.getLogger()
    root.handlers = [PipeLogHandler(conn)]
    root.setLevel(level)
    try:
        env = factory(cfg, seed, PipeSupervisor(conn, stop))
    except BaseException as err:  # handed to the trainer, which raises it
        _send(conn, "error", err)
        return
    if not _send(conn, "ok", None):
        env.close()
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            env.close()
            return
        try:
            status, value = "ok", getattr(env, method)(*args, **kwargs)
        except BaseException as err:
            status, value = "error", err
        if not _send(conn, status, value) and method != "close":  # the trainer died mid-call: a broken pipe
            env.close()
            return
        if method == "close":
            return


def _send(conn: Any, status: str, value: Any) -> bool:
    """Hand ``(status, value)`` to the trainer; False when its end of the pipe is gone."""
    try:
        conn.send((status, value))
    except OSError:  # BrokenPipeError, ConnectionResetError: nobody reads any more
        return False
    except Exception:  # an exception that does not pickle (Boost.Python's): its text is enough
        try:
            conn.send((status, RuntimeError(f"{type(value).__name__}: {value}")))
        except OSError:
            return False
    return True


class ProcessWorker:
    """A CarlaSession (or what ``factory``, a picklable function, builds) in a child process, spawned: a clean
    interpreter, no torch threads or CUDA inherited. A call waits for the answer while the worker reports progress,
    and kills it after ``watchdog_s`` seconds without a word; while it waits, a ``stop_pending()`` that turns true
    is passed on to the worker."""

    def __init__(self, cfg: EnvConfig, seed: int | None, watchdog_s: float, factory: Factory = make_session,
                 stop_pending: Callable[[], bool] = lambda: False) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._stop = ctx.Event()
        self._stop_pending = stop_pending
        level = logging.getLogger().getEffectiveLevel()  # the worker logs what the trainer's log would show
        self._process = ctx.Process(target=_serve, args=(child, factory, cfg, seed, self._stop, level), daemon=True,
                                    name="carla-worker")
        self._process.start()
        child.close()
        self.watchdog_s = watchdog_s
        self._receive()  # the session's constructor: its exception (unreachable, bad config) is raised here

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            self._conn.send((method, args, kwargs))
        except OSError:
            raise WorkerDied(f"the CARLA worker process has ended (exit code {self._process.exitcode})") from None
        return self._receive()

    def _receive(self) -> Any:
        """The answer to the call under way; progress reports on the way renew the watchdog's deadline, and the
        worker's log records are handed to the trainer's loggers of the same names (so to the run's log)."""
        deadline = time.monotonic() + self.watchdog_s
        while True:
            while not self._conn.poll(0.1):
                if not self._stop.is_set() and self._stop_pending():
                    self._stop.set()  # the worker's reconnect loop gives up at once
                if not self._process.is_alive():
                    raise WorkerDied(f"the CARLA worker process ended (exit code {self._process.exitcode})")
                if time.monotonic() > deadline:
                    self.kill()
                    raise WorkerDied(f"the CARLA worker process was silent for {self.watchdog_s:g} s (hung; "
                                     "env.carla.timeout_s and first_frame_timeout_s bound a healthy one's silence)")
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError):
                raise WorkerDied(f"the CARLA worker process ended (exit code {self._process.exitcode})") from None
            if status == "alive":
                deadline = time.monotonic() + self.watchdog_s
                continue
            if status == "log":
                logging.getLogger(value.name).handle(value)
                continue
            if status == "error":
                raise value
            return value

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=10.0)
        self._conn.close()


def watchdog_s(cfg: EnvConfig) -> float:
    """Seconds of silence after which the trainer kills a worker as hung: twice the longest wait a healthy one
    spends between two progress reports (a town load, LOAD_WORLD_TIMEOUT_S; a new scene's tick,
    env.carla.first_frame_timeout_s; a tick plus its camera image, 2 x env.carla.timeout_s; a reconnect back-off,
    at most the session's MAX_BACKOFF_S). 120 s at the defaults."""
    from av_td3.envs.carla.env import MAX_BACKOFF_S as SESSION_BACKOFF_S
    from av_td3.envs.carla.takeover import LOAD_WORLD_TIMEOUT_S

    c = cfg.carla
    return 2.0 * max(LOAD_WORLD_TIMEOUT_S, c.first_frame_timeout_s, 2.0 * c.timeout_s, SESSION_BACKOFF_S)


def start_process_worker(cfg: EnvConfig, seed: int | None, stop_pending: Callable[[], bool]) -> Worker:
    return ProcessWorker(cfg, seed, watchdog_s(cfg), stop_pending=stop_pending)


# Tests swap this for a worker that runs the session in the test's own process, against the test double.
start_worker: StartWorker = start_process_worker


# -------------------------------------------------------------------------------------------------------- env
class CarlaDrivingEnv(gym.Env):
    """The driving env on a CARLA 0.9.16 server, run in a worker process that is restarted when the server is
    lost. Same observation/action/info contract as every backend (:mod:`av_td3.envs.base`), plus
    ``info["reconnects"]``: reconnects and worker restarts so far. ``start`` (a worker factory), ``sleep`` and
    ``clock`` exist for tests."""

    metadata = {"render_modes": []}

    def __init__(self, cfg: EnvConfig, seed: int | None = None, *, start: StartWorker | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self._seed = cfg, seed
        self._reward_components = CARLA.reward_components
        self.observation_space = observation_space(cfg.image.stack, cfg.image.height, cfg.image.width,
                                                   cfg.lane_points, len(CARLA.state_tail))
        self.action_space = action_space()
        self._start = start or start_worker
        self._sleep, self._clock = sleep, clock
        self.restarts = 0  # workers started again after a lost server
        self._earlier = 0  # reconnects and restarts before the current worker
        self._worker_reconnects = 0  # the current worker's own in-process reconnects
        self._last_obs: dict | None = None
        # Set by the trainer: true once a stop signal is pending. A lost server is then not waited for.
        self.stop_pending: Callable[[], bool] = lambda: False
        self._worker: Worker | None = self._start_worker()  # a server missing at start fails here, at once

    @property
    def reconnects(self) -> int:
        return self._earlier + self._worker_reconnects

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        while True:
            try:
                obs, info = self._call("reset", seed=seed, options=options)
                break
            except (WorkerDied, SimulatorLostError) as err:
                self._restart(err)  # and the same reset again, on the fresh worker
        return obs, self._info(info, obs)

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float32).reshape(self.action_space.shape)
        if not np.all(np.isfinite(action)):  # checked here too: the worker's error would read as a lost server
            raise ValueError(f"non-finite action {action.tolist()} refused before it reached the simulator")
        try:
            obs, reward, terminated, truncated, info = self._call("step", action)
        except (WorkerDied, SimulatorLostError) as err:
            self._restart(err)
            # Nothing happened this step: the episode ends as truncated (an interruption, not a failure, so the
            # learner bootstraps) on the last good observation, with nothing earned.
            info = interrupted_info(self._reward_components)
            assert self._last_obs is not None, "step() before reset()"  # gymnasium's contract: reset comes first
            return self._last_obs, 0.0, False, True, self._info(info, self._last_obs)
        return obs, reward, terminated, truncated, self._info(info, obs)

    def close(self) -> None:
        if self._worker is None:
            return
        try:
            self._worker.call("close")
        except (WorkerDied, RuntimeError) as err:
            log.warning("closing the CARLA worker: %s", err)
        finally:
            self._worker.kill()
            self._worker = None

    # --- internals ----------------------------------------------------------------------------------------------
    def _start_worker(self) -> Worker:
        # A lambda: the trainer sets self.stop_pending after the env is built.
        return self._start(self.cfg, self._seed, lambda: self.stop_pending())

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, asking every STOP_POLL_S whether a stop is pending (then return early)."""
        end = self._clock() + seconds
        while not self.stop_pending() and (left := end - self._clock()) > 0:
            self._sleep(min(left, STOP_POLL_S))

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._worker is None:
            raise RuntimeError("the CARLA env is closed")
        return self._worker.call(method, *args, **kwargs)

    def _info(self, info: dict, obs: dict) -> dict:
        self._worker_reconnects = int(info.get("reconnects", 0))
        self._last_obs = obs
        info["reconnects"] = self.reconnects
        return info

    def _restart(self, err: Exception) -> None:
        """Kill the worker and start fresh ones with back-off until one stands; SimulatorLostError after
        env.carla.server_lost_minutes without a server."""
        c = self.cfg.carla
        log.warning("CARLA at %s:%d lost (%s): restarting the worker process.", c.host, c.port, err)
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
        self.restarts += 1
        self._earlier += 1 + self._worker_reconnects  # the lost worker's own reconnects stay counted
        self._worker_reconnects = 0
        deadline = self._clock() + c.server_lost_minutes * 60.0
        delay = BACKOFF_S
        while True:
            if self.stop_pending():  # the trainer stops at once: a fresh worker would only reload the town
                raise StopRequested(f"CARLA at {c.host}:{c.port} lost ({err}) while the run is stopping: "
                                    "no worker restarted")
            try:
                self._worker = self._start_worker()
                log.warning("CARLA at %s:%d: a fresh worker is connected; the episode ends as truncated.",
                            c.host, c.port)
                return
            except (WorkerDied, SimulatorLostError, EnvUnavailableError) as again:
                err = again
            except ConfigError as again:  # the server came back without env.town, or with fewer spawn points
                raise unusable(again, c) from None
            left = deadline - self._clock()
            if left <= 0:
                raise SimulatorLostError(
                    f"no CARLA server at {c.host}:{c.port} for {c.server_lost_minutes:g} minute(s) "
                    f"(env.carla.server_lost_minutes; last error: {err}). Bring the server back (`docker compose -f "
                    "docker/compose.yaml up -d carla`) and rerun the same command: training resumes from the last "
                    "checkpoint.") from None
            self._wait(min(delay, left))
            delay = min(2 * delay, MAX_BACKOFF_S)
