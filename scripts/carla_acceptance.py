"""Acceptance of env=carla on a real CARLA 0.9.16 server: run it once, read the report it writes.

    .venv/bin/python scripts/carla_acceptance.py --host 127.0.0.1 --port 2000 \\
        --restart-cmd "docker compose -f docker/compose.yaml restart carla"      # a real server (a GPU), ~5 min
    .venv/bin/python scripts/carla_acceptance.py --double                        # the test double (CI)

Each check drives the code the trainer uses and prints one line; the report (``--out``, Markdown) holds the
measurements behind each verdict. The exit code is 0 when every check passed, 1 otherwise. The checks:

- ``first_frame``: seconds to take the server over until the camera's images flow; the arrival order of one
  frame's image, collision and on-tick callbacks (a car is driven into a parked one), and whether the collision
  counted at the step of its own frame (else ``env.carla.event_wait_s`` is too short for this server).
- ``same_seed``: two sessions, one after the other, reset with one seed: the same ego start, and NPCs of the
  same blueprints at the same spawn points.
- ``lights``: the town's traffic-light stop lines, and the light ahead in the state vector (metres, colour)
  while a simple lane-keeper drives from a few seeded starts; red-light terminations.
- ``steps_per_s``: env steps per second of one session (a tick, its image and the observation).
- ``close``: after ``close()`` the server is asynchronous with no vehicle or sensor left.
- ``restart_then_sigterm``: a short training run; the server restarts mid-episode (``--restart-cmd``; skipped
  without one): the episode ends interrupted, a fresh worker takes over and training goes on; then SIGTERM:
  the run stops checkpointed and gives the server back (asynchronous, no actors).
- ``sigusr2``: the same stop on a cluster's preemption signal (a stand-in for submitit's requeue handler).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test double lives in tests/

from av_td3.config import Config, to_config  # noqa: E402
from av_td3.envs.carla import worker as carla_worker  # noqa: E402
from av_td3.envs.carla.env import CarlaSession  # noqa: E402
from av_td3.rundir import CHECKPOINT_DIR, STOPPED  # noqa: E402
from av_td3.timing import NoPhases  # noqa: E402

Check = tuple[bool | None, str, list[str]]  # (passed; None: measured only), one line, the report's details
OBSTACLE_AHEAD_M = 8.0  # the parked car the first_frame check drives into


# ------------------------------------------------------------------------------------------------ targets
class RealServer:
    """A CARLA server at host:port, reached with the real client; ``restart_cmd`` restarts it (or None)."""

    name = "CARLA server"

    def __init__(self, host: str, port: int, restart_cmd: str | None) -> None:
        self.host, self.port, self.restart_cmd = host, port, restart_cmd
        import carla

        self.carla = carla
        self.start_worker = carla_worker.start_process_worker

    def overrides(self) -> list[str]:
        return [f"env.carla.host={self.host}", f"env.carla.port={self.port}"]

    def lights_overrides(self) -> list[str]:
        return []  # seeded random starts over the town

    def session(self, cfg: Config, seed: int | None) -> CarlaSession:
        return CarlaSession(cfg.env, seed)

    def server_state(self, timeout_s: float) -> tuple[bool, int]:
        """(synchronous mode, vehicles and sensors on the server) as another client sees them."""
        client = self.carla.Client(self.host, self.port)
        client.set_timeout(timeout_s)
        world = client.get_world()
        actors = [a for a in world.get_actors() if a.type_id.startswith(("vehicle.", "sensor."))]
        return bool(world.get_settings().synchronous_mode), len(actors)

    def obstacle_ahead(self, session: CarlaSession) -> Callable[[], None]:
        """Park a car OBSTACLE_AHEAD_M in front of the ego; returns what removes it."""
        carla, world = self.carla, session._world
        tf = session._ego.get_transform()
        fwd = tf.get_forward_vector()
        where = carla.Transform(carla.Location(x=tf.location.x + OBSTACLE_AHEAD_M * fwd.x,
                                               y=tf.location.y + OBSTACLE_AHEAD_M * fwd.y, z=tf.location.z + 0.5),
                                tf.rotation)
        car = world.try_spawn_actor(world.get_blueprint_library().find("vehicle.audi.a2"), where)
        return (lambda: None) if car is None else car.destroy

    def restart(self) -> bool:
        if not self.restart_cmd:
            return False
        subprocess.run(shlex.split(self.restart_cmd), check=True)
        return True


class DoubleServer:
    """The test double (tests/carla_double.py) in this process: what CI runs, so the script cannot rot."""

    name = "test double"

    def __init__(self) -> None:
        from tests import carla_double

        self.double = carla_double
        self.fake = carla_double.FakeCarlaModule()
        self.fake.server.lane_marking = True  # the trainer's camera check refuses a uniform frame
        sys.modules["carla"] = self.fake  # type: ignore[assignment]  # what a session imports
        self.start_worker = carla_double.inline_workers(self.fake.server)

    def overrides(self) -> list[str]:
        return []

    def lights_overrides(self) -> list[str]:
        self.fake.server.light_state = self.double.TrafficLightState.Red
        return ["env.carla.route.start_index=9"]  # 20 m before the double's one light, at its junction

    def session(self, cfg: Config, seed: int | None) -> CarlaSession:
        return CarlaSession(cfg.env, seed, carla_module=self.double.FakeCarlaModule(server=self.fake.server))

    def server_state(self, timeout_s: float) -> tuple[bool, int]:
        server = self.fake.server
        return bool(server.settings.synchronous_mode), len(server.of_type("vehicle.") + server.of_type("sensor."))

    def obstacle_ahead(self, session: CarlaSession) -> Callable[[], None]:
        self.fake.server.collide_at = {self.fake.server.frame + 3}  # the double scripts its collisions
        return lambda: self.fake.server.collide_at.clear()

    def restart(self) -> bool:
        self.fake.server.restart()
        return True


# ------------------------------------------------------------------------------------------------ checks
def lane_keeper(state: np.ndarray, throttle: float) -> np.ndarray:
    """Steer back to the lane centre (state[1]: metres left of it; state[2]: heading error, radians)."""
    return np.array([np.clip(-0.3 * state[1] - 1.0 * state[2], -1, 1), throttle], dtype=np.float32)


def check_first_frame(target: Any, cfg: Config) -> Check:
    t0 = time.monotonic()
    session = target.session(cfg, 0)
    took = time.monotonic() - t0
    try:
        obs, _ = session.reset(seed=0)
        session._inbox.arrivals = arrivals = []
        remove = target.obstacle_ahead(session)
        hit_frame, counted_at = None, None
        for _ in range(100):
            obs, _, terminated, truncated, info = session.step(lane_keeper(obs["state"], 1.0))
            hits = [f for kind, f, _ in arrivals if kind == "collision"]
            if hits and hit_frame is None:
                hit_frame = hits[0]
            if info["collision"]:
                counted_at = session._frame
            if terminated or truncated:
                break
        remove()
    finally:
        session.close()
    details = [f"take-over until the camera's images flow: {took:.2f} s (env.carla.first_frame_timeout_s "
               f"{cfg.env.carla.first_frame_timeout_s:g})"]
    if hit_frame is None:
        return False, "no collision event in 100 steps at full throttle towards a parked car", details
    frame = [(kind, t) for kind, f, t in arrivals if f == hit_frame]
    t_first = frame[0][1]
    details.append(f"frame {hit_frame}: " + ", ".join(f"{kind} +{1000 * (t - t_first):.1f} ms" for kind, t in frame))
    ok = counted_at == hit_frame
    return ok, (f"collision of frame {hit_frame} counted at the step of frame {counted_at}"
                + ("" if ok else ": raise env.carla.event_wait_s")), details


def check_same_seed(target: Any, cfg: Config) -> Check:
    seen = []
    for _ in range(2):
        session = target.session(cfg, None)
        try:
            session.reset(seed=7)
            points = [(p.location.x, p.location.y) for p in session._spawn_points]

            def nearest(actor: Any, points: list[tuple[float, float]] = points) -> int:
                loc = actor.get_transform().location
                return int(np.argmin([(x - loc.x) ** 2 + (y - loc.y) ** 2 for x, y in points]))

            npcs = sorted((a.type_id, nearest(a)) for a in session._world.get_actors(list(session._npc_ids)))
            seen.append((nearest(session._ego), npcs))
        finally:
            session.close()
    ok = seen[0] == seen[1]
    return ok, f"seed 7 twice: ego at spawn point {seen[0][0]} and {seen[1][0]}, NPCs {'equal' if ok else 'differ'}", [
        f"run {i + 1}: ego {ego}, NPCs (blueprint, nearest spawn point) {npcs}" for i, (ego, npcs) in enumerate(seen)]


def check_lights(target: Any, cfg: Config, seeds: int, steps: int) -> Check:
    session = target.session(cfg, 0)
    details, nearest, red_runs = [], [], 0
    try:
        lines = len(session._stop_lines)
        for seed in range(seeds):
            obs, _ = session.reset(seed=seed)
            readings = []
            for _ in range(steps):
                readings.append((float(obs["state"][-2]), float(obs["state"][-1])))
                obs, _, terminated, truncated, info = session.step(lane_keeper(obs["state"], 0.4))
                red_runs += info["termination"] == "red_light"
                if terminated or truncated:
                    break
            closest = min(readings)
            nearest.append(closest[0])
            colours = sorted({c for _, c in readings})
            details.append(f"seed {seed}: {len(readings)} steps, nearest stop line {closest[0]:.1f} m, colours "
                           f"{colours} (red 1, yellow 0.5, else 0), ended {info['termination'] or 'no'}")
    finally:
        session.close()
    seen = sum(d < 50.0 for d in nearest)
    ok = lines > 0 and seen > 0
    return ok, (f"{cfg.env.town}: {lines} stop lines; a light ahead read from {seen} of {seeds} starts; "
                f"{red_runs} red-light termination(s)"), details


def check_steps_per_s(target: Any, cfg: Config, steps: int) -> Check:
    session = target.session(cfg, 0)
    try:
        obs, _ = session.reset(seed=1)
        t0 = time.monotonic()
        for _ in range(steps):
            obs, _, terminated, truncated, _ = session.step(lane_keeper(obs["state"], 0.3))
            if terminated or truncated:
                obs, _ = session.reset()
        rate = steps / (time.monotonic() - t0)
    finally:
        session.close()
    return None, f"{rate:.1f} env steps/s over {steps} steps (resets included)", []


def check_close(target: Any, cfg: Config) -> Check:
    session = target.session(cfg, 0)
    session.reset(seed=0)
    session.close()
    return server_given_back(target, cfg, "after close()")


def server_given_back(target: Any, cfg: Config, when: str) -> Check:
    synchronous, actors = target.server_state(cfg.env.carla.timeout_s)
    ok = not synchronous and actors == 0
    return ok, f"{when}: {'synchronous' if synchronous else 'asynchronous'}, {actors} vehicles and sensors", []


class AtSteps(NoPhases):
    """The trainer's per-step hook (its phase timer): runs ``actions[step]`` when the loop reaches that step."""

    def __init__(self, actions: dict[int, Callable[[], None]]) -> None:
        self.actions = actions

    def begin_step(self, step: int) -> None:
        if step in self.actions:
            self.actions.pop(step)()


def train_until_signal(target: Any, cfg: Config, run_dir: Path, signum: int, restart_at: int | None,
                       signal_at: int) -> tuple[Any, BaseException | None]:
    """A short training run that restarts the server at ``restart_at`` (None: not) and sends itself ``signum``
    at ``signal_at``; (the trainer, what train() raised)."""
    from av_td3.train import Trainer

    trainer = Trainer(cfg, run_dir)
    actions = {signal_at: lambda: os.kill(os.getpid(), signum)}
    if restart_at is not None:
        actions[restart_at] = target.restart
    trainer.time_phases(AtSteps(actions))
    try:
        trainer.train()
    except BaseException as err:  # the stop the signal asked for, or a failure to report
        return trainer, err
    return trainer, None


def check_restart_then_sigterm(target: Any, cfg: Config, run_dir: Path, restart_at: int | None,
                               stop_at: int) -> Check:
    from av_td3.train import Interrupted

    trainer, err = train_until_signal(target, cfg, run_dir, signal.SIGTERM, restart_at, stop_at)
    env = trainer.envs.envs[0]
    checkpoints = list((run_dir / CHECKPOINT_DIR).glob("*.pt"))
    lost_steps = trainer.step - len(trainer.buffer)  # interrupted steps store nothing (the step never happened)
    given_back = server_given_back(target, cfg, "after SIGTERM")
    details = [f"stopped by {err!r} at env step {trainer.step}; {len(checkpoints)} checkpoint(s); status "
               f"{trainer.summary.status}; worker restarts {env.restarts}, reconnects {env.reconnects}; "
               f"{len(trainer.buffer)} transitions stored for {trainer.step} steps", given_back[1]]
    ok = (isinstance(err, Interrupted) and trainer.summary.status == STOPPED and bool(checkpoints)
          and trainer.step >= stop_at and bool(given_back[0])
          and (restart_at is None or (env.reconnects >= 1 and lost_steps >= 1)))
    what = (f"server restarted at step {restart_at}: {lost_steps} interrupted step(s) not stored, training went "
            "on; " if restart_at is not None else "no --restart-cmd: no restart; ")
    return ok, what + f"SIGTERM at step {stop_at} stopped the run checkpointed; {given_back[1]}", details


def check_sigusr2(target: Any, cfg: Config, run_dir: Path, stop_at: int) -> Check:
    from av_td3.train import Preempted

    requeued: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # submitit's stand-in
    try:
        trainer, err = train_until_signal(target, cfg, run_dir, signal.SIGUSR2, None, stop_at)
    finally:
        signal.signal(signal.SIGUSR2, old)
    checkpoints = list((run_dir / CHECKPOINT_DIR).glob("*.pt"))
    given_back = server_given_back(target, cfg, "after SIGUSR2")
    ok = isinstance(err, Preempted) and bool(checkpoints) and bool(given_back[0])
    return ok, f"SIGUSR2 at step {stop_at}: {err!s}, {len(checkpoints)} checkpoint(s); {given_back[1]}", []


# ------------------------------------------------------------------------------------------------ main
def compose(*overrides: str) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--double", action="store_true", help="run against tests/carla_double.py (CI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2000)
    parser.add_argument("--restart-cmd", help="command that restarts the server (else the restart is skipped)")
    parser.add_argument("--out", type=Path, default=Path("carla_acceptance.md"), help="the report (Markdown)")
    args = parser.parse_args(argv)

    try:
        target = DoubleServer() if args.double else RealServer(args.host, args.port, args.restart_cmd)
    except ImportError:
        print("the CARLA client is missing: .venv/bin/python -m pip install -e '.[carla]'", file=sys.stderr)
        return 2
    quick = args.double  # the double is no simulator: fewer steps show the same
    # steps of the lights drive, of the speed measurement, and of the training runs' events
    starts, drive, timed, restart_at, stop_at = (2, 110, 50, 20, 50) if quick else (10, 400, 500, 40, 100)
    if isinstance(target, RealServer) and not args.restart_cmd:
        restart_at = None
    base = ["env=carla", *target.overrides()]
    cfg = compose(*base)
    lights_cfg = compose(*base, *target.lights_overrides())
    train_cfg = compose(*base, "debug=smoke", f"trainer.total_steps={stop_at + 20}", "trainer.learning_starts=30",
                        "trainer.eval_every=1000", "trainer.checkpoint_every=1000", "trainer.log_every=20",
                        "trainer.resume=none", "env.max_episode_steps=30", "env.npcs=3")
    carla_worker.start_worker = target.start_worker  # the trainer's env starts its workers with it
    results: list[tuple[str, Check]] = []
    with tempfile.TemporaryDirectory(prefix="carla_acceptance_") as tmp:
        checks: list[tuple[str, Callable[[], Check]]] = [
            ("first_frame", lambda: check_first_frame(target, cfg)),
            ("same_seed", lambda: check_same_seed(target, cfg)),
            ("lights", lambda: check_lights(target, lights_cfg, starts, drive)),
            ("steps_per_s", lambda: check_steps_per_s(target, cfg, timed)),
            ("close", lambda: check_close(target, cfg)),
            ("restart_then_sigterm",
             lambda: check_restart_then_sigterm(target, train_cfg, Path(tmp) / "a", restart_at, stop_at)),
            ("sigusr2", lambda: check_sigusr2(target, train_cfg, Path(tmp) / "b", stop_at // 2)),
        ]
        for name, run in checks:
            t0 = time.monotonic()
            try:
                result = run()
            except Exception as err:  # one failing check must not hide the others
                result = (False, f"raised {type(err).__name__}: {err}", [])
            result[2].append(f"the check took {time.monotonic() - t0:.1f} s")
            results.append((name, result))
            print(f"{name:22s} {({True: 'PASS', False: 'FAIL', None: 'INFO'})[result[0]]}  {result[1]}", flush=True)
    write_report(args.out, target.name, results)
    print(f"report: {args.out}")
    return 0 if all(ok is not False for _, (ok, _, _) in results) else 1


def write_report(path: Path, target: str, results: list[tuple[str, Check]]) -> None:
    lines = [f"# env=carla acceptance against the {target}", "", f"{time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "| check | result | what |", "| --- | --- | --- |"]
    for name, (ok, line, _) in results:
        lines.append(f"| {name} | {({True: 'pass', False: 'FAIL', None: 'measured'})[ok]} | {line} |")
    for name, (_, _, details) in results:
        if details:
            lines += ["", f"## {name}", ""] + [f"- {d}" for d in details]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
