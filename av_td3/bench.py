"""``av-td3 bench``: throughput and memory side by side, in one process, on identical sizes.

Rows (each measured ``reps`` times; update rows are interleaved A B C, C B A, ... so slow drifts of the machine —
other processes, thermal state — hit every contender alike; medians are reported with the min and max):

* ``update/*``: TD3 updates per second, each update = one replay sample + one critic update (+ every
  ``policy_freq`` an actor and target update): ours with ``agent.encoder=separate`` and ``shared`` (monitoring on),
  ours ``separate`` with monitoring off, and Stable-Baselines3's ``TD3.train()`` with a matching ``CnnPolicy``
  (NatureCNN with our ``features_dim``, ``net_arch`` = our hidden sizes, ``share_features_extractor=False``,
  same batch size, learning rate, tau, gamma, policy delay and target noise; its replay buffer filled with random
  uint8 frames of the same shape). SB3 is the benchmark-only extra ``pip install '.[bench]'``.
* ``replay/*``: bytes per stored transition, from the arrays actually allocated (``nbytes / capacity``): ours and
  SB3's ``ReplayBuffer`` with and without ``optimize_memory_usage``.
* ``env/*``: the embedded simulator's steps per second at ``env.npcs`` NPCs, random actions; also with
  highway-env's own (unvectorised) road queries and with the bird's-eye view (``env.view=bev``), interleaved rep
  by rep.
* ``e2e/*``: environment steps per second of a short real training run (:class:`av_td3.train.Trainer`:
  acting, stepping, storing, sampling, updating), measured over its log intervals after ``learning_starts``.

Everything goes into ``out`` (``bench.json``, ``bench.md``, the e2e run's folder); nothing is written elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SB3_MISSING = ("stable-baselines3 is not installed, so the SB3 rows are skipped: install the benchmark extra "
               "with `pip install '.[bench]'`")

# Targets of the performance issue (benchmarks on a 2-core CPU at batch 64, 84x84x4, not timed tests).
TARGETS = {
    "separate_vs_sb3": (">=", 1.15),
    "shared_vs_sb3": (">=", 1.6),
    "monitor_overhead_pct": ("<=", 3.0),
    "replay_vs_reference": ("<=", 1.1),
    "env_steps_per_s": (">=", 100.0),
    "env_bev_steps_per_s": (">=", 100.0),
}


@dataclass
class BenchConfig:
    """What is measured and how long. :func:`preset` gives the default (full) and ``--quick`` settings."""
    device: str = "cpu"
    threads: int = 0                 # torch intra-op threads; 0 keeps torch's default
    seed: int = 0
    # shapes and sizes (ours and SB3's alike)
    height: int = 84
    width: int = 84
    stack: int = 4
    batch_size: int = 64
    features_dim: int = 64
    hidden_dim: int = 256
    hidden_layers: int = 2
    lane_points: int = 5             # our state vector: 5 + 2 * lane_points floats
    # update rows
    update_reps: int = 9
    updates_per_rep: int = 40
    warmup_updates: int = 4
    fill: int = 1000                 # random transitions in each replay buffer the updates sample from
    update_rows: tuple[str, ...] = ("ours_separate", "ours_separate_monitor_off", "ours_shared",
                                    "ours_shared_monitor_off", "ours_separate_compile", "sb3")
    # replay rows
    replay_capacity: int = 2000
    # env rows
    npcs: int = 20
    env_reps: int = 5
    env_steps_per_rep: int = 400
    # end-to-end row
    e2e_total_steps: int = 1000
    e2e_learning_starts: int = 200
    e2e_log_every: int = 100
    e2e_max_episode_steps: int = 200
    e2e_encoder: str = "separate"
    e2e_num_envs: tuple[int, ...] = (1, 2)  # one run each: env.num_envs=1, and simulators in worker processes
    sections: tuple[str, ...] = ("update", "replay", "env", "e2e")


def preset(quick: bool) -> BenchConfig:
    if not quick:
        return BenchConfig()
    # ~2 minutes on a 2-core CPU: fewer repetitions and shorter runs, same shapes.
    return BenchConfig(update_reps=5, updates_per_rep=12, warmup_updates=2, fill=300, env_reps=3,
                       update_rows=("ours_separate", "ours_separate_monitor_off", "ours_shared", "sb3"),
                       env_steps_per_rep=150, e2e_total_steps=120, e2e_learning_starts=40, e2e_log_every=40,
                       e2e_max_episode_steps=100, e2e_num_envs=(1,))


@dataclass
class Row:
    name: str
    unit: str
    values: list[float]
    note: str = ""
    cpu_values: list[float] | None = None  # update rows: updates per second of this process's CPU time


    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": float(min(self.values)),
                "max": float(max(self.values)), "reps": len(self.values), "values": list(map(float, self.values)),
                "note": self.note, "cpu_values": self.cpu_values,
                "cpu_median": None if self.cpu_values is None else float(statistics.median(self.cpu_values))}


@dataclass
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # row name -> why
    ratios: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "config": self.config, "rows": [r.to_dict() for r in self.rows],
                "ratios": self.ratios, "targets": targets(self.ratios), "skipped": self.skipped}


# ----------------------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on. ``load_avg`` is taken at the start: other busy processes on a small
    machine distort every row (with 2 cores, one busy neighbour halves a 2-thread torch op or worse)."""
    import psutil

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(), "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
        "device": str(device), "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # Thread settings that change every row (OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning).
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                               "KMP_BLOCKTIME", "GOMP_SPINCOUNT")},
    }
    try:
        import stable_baselines3
        info["stable_baselines3"] = stable_baselines3.__version__
    except ImportError:
        info["stable_baselines3"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence warnings of the given loggers (random data makes the monitor's alerts fire on purpose)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


# ----------------------------------------------------------------------------------------------------------- updates
def _state_dim(cfg: BenchConfig) -> int:
    from av_td3.envs.base import state_dim
    return state_dim(cfg.lane_points)


def _agent_config(cfg: BenchConfig, encoder: str):
    from av_td3.config import AgentConfig
    return AgentConfig(batch_size=cfg.batch_size, encoder=encoder, features_dim=cfg.features_dim,
                       hidden_dim=cfg.hidden_dim, hidden_layers=cfg.hidden_layers, buffer_size=cfg.fill + 10)


def filled_buffer(cfg: BenchConfig, device: torch.device, episode_len: int = 100):
    """Our replay buffer holding ``cfg.fill`` random transitions (episodes of ``episode_len`` steps)."""
    from av_td3.replay import ReplayBuffer

    rng = np.random.default_rng(cfg.seed)
    sd = _state_dim(cfg)
    buf = ReplayBuffer(cfg.fill + cfg.fill // episode_len + 2, (cfg.height, cfg.width), cfg.stack, sd, 2,
                       seed=cfg.seed, device=device)

    def obs() -> dict[str, np.ndarray]:
        return {"image": rng.integers(0, 256, (1, cfg.stack, cfg.height, cfg.width), dtype=np.uint8),
                "state": rng.standard_normal((1, sd)).astype(np.float32)}

    buf.start_episode(obs())
    for i in range(cfg.fill):
        end = (i + 1) % episode_len == 0
        buf.add(rng.uniform(-1, 1, (1, 2)).astype(np.float32), rng.standard_normal(1).astype(np.float32), obs(),
                np.array([end]), np.zeros(1, dtype=bool))
        if end:
            buf.start_episode(obs())
    return buf


def our_updater(cfg: BenchConfig, device: torch.device, encoder: str, monitor: bool,
                compile: bool = False) -> Callable[[int], float]:
    """``run(n)`` → seconds for n × (sample + update) with our agent, including one monitor flush per call
    (the training loop flushes every ``trainer.log_every`` steps)."""
    from av_td3.agent.td3 import TD3, Spec
    from av_td3.config import MonitorConfig
    from av_td3.envs.base import ACTION_NAMES, state_scale

    sd = _state_dim(cfg)
    spec = Spec(stack=cfg.stack, height=cfg.height, width=cfg.width, state_dim=sd, action_dim=2,
                state_scale=state_scale(cfg.lane_points, 4.0), action_names=ACTION_NAMES)
    agent_cfg = _agent_config(cfg, encoder)
    agent_cfg.compile = compile
    agent = TD3(agent_cfg, MonitorConfig(enabled=monitor), spec, device, q_bound=1e9, seed=cfg.seed)
    buf = filled_buffer(cfg, device)
    step = [0]

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step[0] += 1
            agent.update(buf.sample(cfg.batch_size), step[0])
        agent.monitor.flush(step[0])
        _sync(device)
        return time.perf_counter() - start

    return run


def _image_env(cfg: BenchConfig):
    import gymnasium as gym

    class RandomImageEnv(gym.Env):
        """Only its spaces matter: SB3 builds its policy and replay buffer from them."""
        observation_space = gym.spaces.Box(0, 255, (cfg.stack, cfg.height, cfg.width), np.uint8)
        action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 0.0, False, False, {}

    return RandomImageEnv()


def sb3_updater(cfg: BenchConfig, device: torch.device) -> Callable[[int], float]:
    """``run(n)`` → seconds for SB3's ``TD3.train(gradient_steps=n)`` (which samples its replay buffer itself).
    Raises ImportError when SB3 is missing."""
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.torch_layers import NatureCNN

    a = _agent_config(cfg, "separate")
    model = SB3TD3(
        "CnnPolicy", _image_env(cfg), learning_rate=a.lr.critic, buffer_size=cfg.fill + 10, learning_starts=0,
        batch_size=cfg.batch_size, tau=a.tau, gamma=a.gamma, policy_delay=a.policy_freq,
        target_policy_noise=a.policy_noise, target_noise_clip=a.noise_clip, seed=cfg.seed, device=device,
        policy_kwargs=dict(net_arch=[cfg.hidden_dim] * cfg.hidden_layers, features_extractor_class=NatureCNN,
                           features_extractor_kwargs=dict(features_dim=cfg.features_dim),
                           share_features_extractor=False))
    model.set_logger(Logger(folder=None, output_formats=[]))  # records in memory only: no files
    rng = np.random.default_rng(cfg.seed)
    shape = (1, cfg.stack, cfg.height, cfg.width)
    for _ in range(cfg.fill):
        frames = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
        model.replay_buffer.add(frames[0], frames[1], rng.uniform(-1, 1, (1, 2)).astype(np.float32),
                                rng.standard_normal(1).astype(np.float32), np.zeros(1, dtype=np.float32), [{}])

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        model.train(gradient_steps=n, batch_size=cfg.batch_size)
        _sync(device)
        return time.perf_counter() - start

    return run


UPDATE_ROWS = {
    "ours_separate": ("agent.encoder=separate, monitor on", lambda c, d: our_updater(c, d, "separate", True)),
    "ours_separate_monitor_off": ("agent.encoder=separate, monitor.enabled=false",
                                  lambda c, d: our_updater(c, d, "separate", False)),
    "ours_shared": ("agent.encoder=shared, monitor on", lambda c, d: our_updater(c, d, "shared", True)),
    "ours_shared_monitor_off": ("agent.encoder=shared, monitor.enabled=false",
                                lambda c, d: our_updater(c, d, "shared", False)),
    "ours_separate_compile": ("agent.encoder=separate, monitor on, agent.compile=true (compiled during warm-up)",
                              lambda c, d: our_updater(c, d, "separate", True, compile=True)),
    "sb3": ("stable-baselines3 TD3.train(), CnnPolicy", lambda c, d: sb3_updater(c, d)),
}


def interleave(runners: dict[str, Callable[[int], float]], reps: int, n: int,
               warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Rates of every runner, ``reps`` times, in the order A B C, C B A, A B C, ...: (n / wall seconds, n / CPU
    seconds of this process). CPU time is what the process itself spent; with one thread it hardly moves when
    other processes compete for the cores, which makes it the steadier figure for small differences."""
    for run in runners.values():
        if warmup:
            run(warmup)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    cpu_rates: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for rep in range(reps):
        for k in (names if rep % 2 == 0 else names[::-1]):
            cpu0 = time.process_time()
            wall = runners[k](n)
            cpu = time.process_time() - cpu0
            rates[k].append(n / wall)
            cpu_rates[k].append(n / max(cpu, 1e-9))
    return rates, cpu_rates


def bench_updates(cfg: BenchConfig, device: torch.device, result: BenchResult, say: Callable[[str], None]) -> None:
    runners: dict[str, Callable[[int], float]] = {}
    for name in cfg.update_rows:
        label, build = UPDATE_ROWS[name]
        try:
            runners[name] = build(cfg, device)
        except ImportError:
            if name != "sb3":
                raise
            result.skipped[f"update/{name}"] = SB3_MISSING
            say(SB3_MISSING)
    say(f"updates: {', '.join(runners)} x {cfg.update_reps} reps of {cfg.updates_per_rep} (interleaved)")
    with _quiet("av_td3.agent.monitor"):
        rates, cpu_rates = interleave(runners, cfg.update_reps, cfg.updates_per_rep, cfg.warmup_updates)
    for name, values in rates.items():
        result.rows.append(Row(f"update/{name}", "updates/s", values, UPDATE_ROWS[name][0], cpu_rates[name]))


# ------------------------------------------------------------------------------------------------------------ replay
def sb3_replay_bytes(cfg: BenchConfig, optimize_memory_usage: bool) -> float:
    """Bytes per transition SB3's ReplayBuffer allocates for our image observation (its CnnPolicy input, the
    stacked frames; no state vector) and action: the nbytes of every array it holds / buffer_size."""
    from stable_baselines3.common.buffers import ReplayBuffer as SB3Replay

    env = _image_env(cfg)
    buf = SB3Replay(cfg.replay_capacity, env.observation_space, env.action_space, device="cpu", n_envs=1,
                    optimize_memory_usage=optimize_memory_usage, handle_timeout_termination=not optimize_memory_usage)
    total = sum(v.nbytes for v in vars(buf).values() if isinstance(v, np.ndarray))
    return total / buf.buffer_size


def reference_bytes(cfg: BenchConfig) -> int:
    """One frame + the state vector + action + reward: the least a transition can be stored in."""
    return cfg.height * cfg.width + 4 * _state_dim(cfg) + 4 * 2 + 4


def bench_replay(cfg: BenchConfig, result: BenchResult, say: Callable[[str], None]) -> None:
    from av_td3.replay import ReplayBuffer

    buf = ReplayBuffer(cfg.replay_capacity, (cfg.height, cfg.width), cfg.stack, _state_dim(cfg), 2)
    ours = buf.nbytes / cfg.replay_capacity
    result.rows.append(Row("replay/ours", "bytes/transition", [ours],
                           "newest frame + state + step + action + reward + flags, per row"))
    result.rows.append(Row("replay/reference", "bytes/transition", [float(reference_bytes(cfg))],
                           "one frame + state + action + reward"))
    for opt in (False, True):
        name = f"replay/sb3{'_optimize_memory_usage' if opt else ''}"
        try:
            value = sb3_replay_bytes(cfg, opt)
        except ImportError:
            result.skipped[name] = SB3_MISSING
            continue
        result.rows.append(Row(name, "bytes/transition", [value],
                               f"SB3 ReplayBuffer, optimize_memory_usage={opt}: stacked image obs (no state)"))
    say(f"replay: ours {ours:.0f} bytes/transition")


# --------------------------------------------------------------------------------------------------------------- env
def _env_config(cfg: BenchConfig, **kw: Any):
    from av_td3.config import EnvConfig, ImageConfig
    return EnvConfig(npcs=cfg.npcs, image=ImageConfig(height=cfg.height, width=cfg.width, stack=cfg.stack), **kw)


def bench_env(cfg: BenchConfig, result: BenchResult, say: Callable[[str], None]) -> None:
    """Random actions; ``env/steps_per_s`` times the step calls only, ``env/steps_per_s_with_resets`` includes the
    resets (random driving crashes every few steps, far more often than training episodes end).
    ``env/steps_per_s_stock_road`` is the same simulator with highway-env's own per-vehicle road queries instead
    of the vectorised ones (:mod:`av_td3.envs.fast_road`), ``env/steps_per_s_bev`` the default simulator drawing
    the bird's-eye view (``env.view=bev``) instead of the world view; all interleaved rep by rep on the same
    actions."""
    from av_td3.envs.highway import HighwayDrivingEnv

    envs = {"ours": HighwayDrivingEnv(_env_config(cfg), seed=cfg.seed),
            "stock": HighwayDrivingEnv(_env_config(cfg), seed=cfg.seed, vectorised_road=False),
            "bev": HighwayDrivingEnv(_env_config(cfg, view="bev"), seed=cfg.seed)}
    stepping: dict[str, list[float]] = {k: [] for k in envs}
    overall: list[float] = []
    resets = 0
    for env in envs.values():
        env.reset()
        env.step(np.zeros(2, dtype=np.float32))  # warm-up
    for rep in range(cfg.env_reps):
        for name in envs if rep % 2 == 0 else reversed(envs):
            env, rng = envs[name], np.random.default_rng(cfg.seed + rep)
            t_step = 0.0
            start = time.perf_counter()
            for _ in range(cfg.env_steps_per_rep):
                action = rng.uniform(-1, 1, 2).astype(np.float32)
                t0 = time.perf_counter()
                _, _, term, trunc, _ = env.step(action)
                t_step += time.perf_counter() - t0
                if term or trunc:
                    env.reset()
                    resets += name == "ours"
            if name == "ours":
                overall.append(cfg.env_steps_per_rep / (time.perf_counter() - start))
            stepping[name].append(cfg.env_steps_per_rep / t_step)
    for env in envs.values():
        env.close()
    note = f"env.npcs={cfg.npcs}, {cfg.stack}x{cfg.height}x{cfg.width}, random actions"
    result.rows.append(Row("env/steps_per_s", "steps/s", stepping["ours"], note + ", step() only"))
    steps = cfg.env_reps * cfg.env_steps_per_rep
    result.rows.append(Row("env/steps_per_s_with_resets", "steps/s", overall,
                           note + f", resets included ({resets} resets in {steps} steps)"))
    result.rows.append(Row("env/steps_per_s_stock_road", "steps/s", stepping["stock"],
                           note + ", step() only, highway-env's own road queries"))
    result.rows.append(Row("env/steps_per_s_bev", "steps/s", stepping["bev"], note + ", step() only, env.view=bev"))
    say(f"env: {statistics.median(stepping['ours']):.1f} steps/s (step only), "
        f"{statistics.median(stepping['stock']):.1f} with highway-env's own road queries, "
        f"{statistics.median(stepping['bev']):.1f} with env.view=bev")


# --------------------------------------------------------------------------------------------------------------- e2e
def bench_e2e(cfg: BenchConfig, out: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    """Short real training runs on ``out/e2e_run[_num_envs_N]``, one per ``e2e_num_envs``; env steps/s of each log
    interval after learning starts."""
    for n in cfg.e2e_num_envs:
        suffix = "" if n == 1 else f"_num_envs_{n}"
        rates, wall = _e2e_run(cfg, out / f"e2e_run{suffix}", n)
        result.rows.append(Row(f"e2e/steps_per_s{suffix}", "env steps/s", rates,
                               f"Trainer, agent.encoder={cfg.e2e_encoder}, monitor on, env.npcs={cfg.npcs}, "
                               f"env.num_envs={n}, 1 update per env step after learning_starts="
                               f"{cfg.e2e_learning_starts}; one value per log interval (run wall time {wall:.0f} s "
                               "incl. start-up and final eval)"))
        say(f"e2e (env.num_envs={n}): {statistics.median(rates):.1f} env steps/s while training")


def _e2e_run(cfg: BenchConfig, run_dir: Path, num_envs: int) -> tuple[list[float], float]:
    import csv

    from av_td3.config import Config, CsvConfig, LoggerConfig, MonitorConfig, TrainerConfig, to_config
    from av_td3.train import Trainer

    a = _agent_config(cfg, cfg.e2e_encoder)
    a.buffer_size = cfg.e2e_total_steps + 10
    big = cfg.e2e_total_steps * 10  # no evaluation or checkpoint before the end
    conf = to_config(Config(
        seed=cfg.seed,
        trainer=TrainerConfig(total_steps=cfg.e2e_total_steps, learning_starts=cfg.e2e_learning_starts,
                              eval_every=big, eval_episodes=1, checkpoint_every=big, checkpoint_buffer=False,
                              log_every=cfg.e2e_log_every, device=str(cfg.device), resume="none",
                              torch_threads=torch.get_num_threads(), progress=False),
        agent=a, env=_env_config(cfg, max_episode_steps=cfg.e2e_max_episode_steps, num_envs=num_envs),
        monitor=MonitorConfig(), logger=LoggerConfig(csv=CsvConfig())))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _quiet("av_td3.agent.monitor", "av_td3.train"):
        Trainer(conf, run_dir).train()
    wall = time.perf_counter() - start
    rates = []
    with open(run_dir / "scalars.csv", newline="") as f:
        for row in csv.DictReader(f):
            # An interval ending after learning_starts + log_every lies wholly in the updating phase.
            if row["tag"] == "perf/steps_per_s" and int(row["step"]) >= cfg.e2e_learning_starts + cfg.e2e_log_every:
                rates.append(float(row["value"]))
    if not rates:
        raise RuntimeError(f"e2e run logged no perf/steps_per_s after learning_starts in {run_dir}")
    return rates, wall


# ------------------------------------------------------------------------------------------------------- the report
def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a_i / b_i: each repetition ran both back to back, under the same load."""
    return float(statistics.median(x / y for x, y in zip(a, b)))


def compute_ratios(result: BenchResult) -> dict[str, float]:
    """Update ratios are medians of per-repetition ratios (wall time; ``*_cpu``: process CPU time); the
    monitor overhead is the extra time per update with monitoring on, in %."""
    rows = {r.name: r for r in result.rows}
    ratios: dict[str, float] = {}

    def pair(a: str, b: str, key: str, fn: Callable[[float], float] = lambda x: x) -> None:
        if f"update/{a}" in rows and f"update/{b}" in rows:
            ra, rb = rows[f"update/{a}"], rows[f"update/{b}"]
            ratios[key] = fn(paired_ratio(ra.values, rb.values))
            if ra.cpu_values and rb.cpu_values:
                ratios[f"{key}_cpu"] = fn(paired_ratio(ra.cpu_values, rb.cpu_values))

    for mode in ("separate", "shared", "separate_compile"):
        pair(f"ours_{mode}", "sb3", f"{mode}_vs_sb3")
    pair("ours_separate_compile", "ours_separate", "compile_speedup")
    overhead = lambda r: (r - 1.0) * 100.0  # noqa: E731  (rate off / rate on - 1)
    pair("ours_separate_monitor_off", "ours_separate", "monitor_overhead_pct", overhead)
    pair("ours_shared_monitor_off", "ours_shared", "monitor_overhead_pct_shared", overhead)
    med = {r.name: r.median for r in result.rows}
    if "replay/ours" in med:
        ratios["replay_vs_reference"] = med["replay/ours"] / med["replay/reference"]
        for name in ("replay/sb3", "replay/sb3_optimize_memory_usage"):
            if name in med:
                ratios[f"{name.split('/')[1]}_vs_ours"] = med[name] / med["replay/ours"]
    if "env/steps_per_s" in med:
        ratios["env_steps_per_s"] = med["env/steps_per_s"]
    if "env/steps_per_s_bev" in med:
        ratios["env_bev_steps_per_s"] = med["env/steps_per_s_bev"]
    for name in med:
        if name.startswith("e2e/steps_per_s_num_envs_"):
            ratios[f"e2e_{name.removeprefix('e2e/steps_per_s_')}_vs_1"] = med[name] / med["e2e/steps_per_s"]
    if "env/steps_per_s_stock_road" in rows:
        ratios["env_vectorised_road_speedup"] = paired_ratio(rows["env/steps_per_s"].values,
                                                             rows["env/steps_per_s_stock_road"].values)
    return ratios


def targets(ratios: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for key, (op, bound) in TARGETS.items():
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"name": key, "value": value, "target": f"{op} {bound:g}", "met": met})
    return out


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def markdown(result: BenchResult) -> str:
    m, c = result.machine, result.config
    load = m.get("load_avg_1m_at_start")
    lines = [f"# av-td3 bench ({c['timestamp']})", "",
             f"Machine: {m['cpu_model']}, {m['logical_cores']} logical / {m['physical_cores']} physical cores, "
             f"torch {m['torch']} ({m['torch_threads']} threads, {m['cpu_capability']}), device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f", SB3 {m['stable_baselines3'] or 'not installed'}"
             + (f", load average {load:.2f} at start" if load is not None else "")
             + "".join(f", {k}={v}" for k, v in m.get("env", {}).items() if v is not None) + ".", "",
             f"Sizes: batch {c['batch_size']}, image {c['stack']}x{c['height']}x{c['width']}, features_dim "
             f"{c['features_dim']}, hidden {c['hidden_layers']}x{c['hidden_dim']}; {'quick' if c['quick'] else 'full'}"
             f" run. Update rows: {c['update_reps']} interleaved reps of {c['updates_per_rep']} updates.", "",
             "| row | median | unit | min | max | reps | per CPU-second | what |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in result.rows:
        cpu = "" if r.cpu_values is None else _fmt(statistics.median(r.cpu_values))
        lines.append(f"| {r.name} | {_fmt(r.median)} | {r.unit} | {_fmt(min(r.values))} | {_fmt(max(r.values))} "
                     f"| {len(r.values)} | {cpu} | {r.note} |")
    for name, why in result.skipped.items():
        lines.append(f"| {name} | skipped | | | | | | {why} |")
    warning = busy_warning(m)
    if warning:
        lines += ["", f"**Warning:** {warning}"]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    shown = set()
    for t in targets(result.ratios):
        shown.add(t["name"])
        value = "n/a" if t["value"] is None else _fmt(t["value"])
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {value} | {t['target']} | {met} |")
    for k, v in result.ratios.items():
        if k not in shown:
            lines.append(f"| {k} | {_fmt(v)} | | |")
    return "\n".join(lines) + "\n"


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A line when other processes were using the CPU as the run started (1-minute load average above 0.5; the
    end value includes this run's own threads), which slows every row and multi-threaded ones most."""
    load = machine.get("load_avg_1m_at_start")
    if load is None or load <= 0.5:
        return None
    return (f"the 1-minute load average was {load:.2f} on {machine.get('logical_cores')} cores when the run started: "
            "other processes were running, which slows every row (multi-threaded torch ops most, as their threads "
            "wait for each other) and makes the rows noisier; rerun on an idle machine, or compare with --threads 1 "
            "or with OMP_WAIT_POLICY=PASSIVE set.")


def default_out() -> Path:
    return Path("outputs") / "bench" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_bench(cfg: BenchConfig, out: Path, quick: bool = False,
              say: Callable[[str], None] = lambda s: print(s, flush=True)) -> BenchResult:
    """Run the selected sections, write ``out/bench.json`` and ``out/bench.md``, return the result."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    result = BenchResult(machine_info(device),
                         {**dataclasses.asdict(cfg), "quick": quick,
                          "timestamp": _dt.datetime.now().isoformat(timespec="seconds")})
    torch.manual_seed(cfg.seed)
    if "update" in cfg.sections:
        bench_updates(cfg, device, result, say)
    if "replay" in cfg.sections:
        bench_replay(cfg, result, say)
    if "env" in cfg.sections:
        bench_env(cfg, result, say)
    if "e2e" in cfg.sections:
        bench_e2e(cfg, out, result, say)
    result.machine["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result.ratios = compute_ratios(result)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "bench.md").write_text(markdown(result))
    return result
