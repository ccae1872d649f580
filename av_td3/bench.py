"""``av-td3 bench``: throughput and memory side by side, in one process, on identical sizes.

The headline rows measure the shipped default configuration: ``conf/`` composed by Hydra as ``launch.py`` composes
it (plus ``BenchConfig.overrides``), so they follow the defaults when those change:

* ``update/default`` (``_monitor_off``): sample + update of the agent the trainer builds from that configuration;
* ``matmul/sgemm_<n>``: the machine's float32 matmul rate in this process (GFLOP/s), interleaved with the updates.
  Every update row carries its FLOP per update (counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  critic+actor cycle of ``policy_freq`` updates, averaged) and the fraction of the matmul rate it reaches;
* ``e2e/default``: a real training run at that configuration; ``e2e/default_sb3``: Stable-Baselines3's
  ``TD3.learn()`` on the same registered env (``av_td3/Highway-v0``) and sizes, right after it in the same process;
* the phase breakdown of ``e2e/default``'s training steps (act, env step, store, sample, critic, actor, target,
  monitor, log, ...), timed by an :class:`av_td3.timing.PhaseTimer` the trainer and the agent lap.

Secondary rows keep the fixed sizes of the earlier issue (``BenchConfig.height`` ... ``batch_size``). Rows (each
measured ``reps`` times; update rows are interleaved A B C, C B A, ... so slow drifts of the machine — other
processes, thermal state — hit every contender alike; medians are reported with the min and max):

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # the bench imports these lazily: `av-td3 bench --only replay` builds no agent
    from av_td3.agent.td3 import TD3, Spec
    from av_td3.config import Config
    from av_td3.replay import ReplayBuffer
    from av_td3.timing import PhaseTimer

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
    # the performance issue's targets at the default configuration (2-core CPU)
    "default_update_matmul_fraction": (">=", 0.7),
    "default_monitor_overhead_pct": ("<=", 3.0),
    "default_e2e_steps_per_s": (">=", 20.0),
    "default_e2e_vs_sb3": (">=", 2.5),
}
# Phases of a training step that run once per run rather than per step (the final evaluation and checkpoint fall
# in the timed window): listed next to the breakdown, not in its shares.
NOT_PER_STEP = ("eval_checkpoint",)


@dataclass
class BenchConfig:
    """What is measured and how long. :func:`preset` gives the default (full) and ``--quick`` settings."""
    device: str = "cpu"
    threads: int = 0                 # torch intra-op threads; 0 keeps torch's default
    seed: int = 0
    # the headline ("default") rows: conf/ composed by Hydra with these overrides (e.g. "agent.batch_size=64")
    overrides: tuple[str, ...] = ()
    matmul_size: int = 2048          # the float32 matmul (n x n @ n x n) whose rate the update rows are held to
    # shapes and sizes of the secondary rows (ours and SB3's alike)
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
    update_rows: tuple[str, ...] = ("default", "default_monitor_off", "ours_separate", "ours_separate_monitor_off",
                                    "ours_shared", "ours_shared_monitor_off", "ours_separate_compile", "sb3")
    # replay rows
    replay_capacity: int = 2000
    # env rows
    npcs: int = 20
    env_reps: int = 5
    env_steps_per_rep: int = 400
    # end-to-end rows (the default rows start learning at max(e2e_learning_starts, batch size), rounded up to a
    # multiple of e2e_log_every, and learn for as many steps as the fixed-size rows)
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
                       update_rows=("default", "ours_separate", "ours_separate_monitor_off", "ours_shared", "sb3"),
                       env_steps_per_rep=150, e2e_total_steps=120, e2e_learning_starts=40, e2e_log_every=40,
                       e2e_max_episode_steps=100, e2e_num_envs=(1,))


@dataclass
class Row:
    name: str
    unit: str
    values: list[float]
    note: str = ""
    cpu_values: list[float] | None = None  # update rows: updates per second of this process's CPU time
    flop_per_update: float | None = None   # update rows: FLOP counted over one critic+actor cycle, per update
    matmul_fraction: float | None = None   # update rows: (updates/s x FLOP/update) / matmul FLOP/s, paired by rep

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": float(min(self.values)),
                "max": float(max(self.values)), "reps": len(self.values), "values": list(map(float, self.values)),
                "note": self.note, "cpu_values": self.cpu_values,
                "cpu_median": None if self.cpu_values is None else float(statistics.median(self.cpu_values)),
                "flop_per_update": self.flop_per_update, "matmul_fraction": self.matmul_fraction}


@dataclass
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # row name -> why
    ratios: dict[str, float] = field(default_factory=dict)
    # e2e/default's training steps: {"steps", "ms_per_step", "phases": {name: {"ms_per_step", "share"}},
    # "not_per_step_s": {name: seconds}}; see phase_breakdown
    breakdown: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "config": self.config, "rows": [r.to_dict() for r in self.rows],
                "ratios": self.ratios, "targets": targets(self.ratios), "skipped": self.skipped,
                "breakdown": self.breakdown}


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


def default_config(overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The shipped default :class:`av_td3.config.Config`: ``conf/`` composed by Hydra (as ``launch.py`` does) with
    ``overrides`` (``key=value`` strings, as on the training command line), validated."""
    from hydra import compose, initialize_config_dir

    from av_td3.config import to_config

    conf_dir = Path(__file__).resolve().parent / "conf"  # shipped inside the package (a link in a checkout)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def default_sizes(conf: Config) -> dict[str, Any]:
    """What the default rows measure, for their notes and ``bench.json``."""
    a, e = conf.agent, conf.env
    return {"stack": e.image.stack, "height": e.image.height, "width": e.image.width, "batch_size": a.batch_size,
            "encoder": a.encoder, "features_dim": a.features_dim, "hidden_dim": a.hidden_dim,
            "hidden_layers": a.hidden_layers, "policy_freq": a.policy_freq, "monitor": conf.monitor.enabled,
            "npcs": e.npcs, "num_envs": e.num_envs, "updates_per_step": conf.trainer.updates_per_step}


def describe_default(conf: Config, monitor: bool = True) -> str:
    """The default configuration's sizes in words (``monitor``: say whether the monitor is on)."""
    d = default_sizes(conf)
    return (f"default config: {d['stack']}x{d['height']}x{d['width']} frames, batch {d['batch_size']}, "
            f"agent.encoder={d['encoder']}, features {d['features_dim']}, hidden {d['hidden_layers']}x"
            f"{d['hidden_dim']}" + (f", monitor {'on' if d['monitor'] else 'off'}" if monitor else ""))


def random_buffer(spec: Spec, fill: int, seed: int, device: torch.device, episode_len: int = 100) -> ReplayBuffer:
    """Our replay buffer holding ``fill`` random transitions of ``spec``'s shapes (episodes of ``episode_len``)."""
    from av_td3.replay import ReplayBuffer

    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(fill + fill // episode_len + 2, (spec.height, spec.width), spec.stack, spec.state_dim,
                       spec.action_dim, seed=seed, device=device)

    def obs() -> dict[str, np.ndarray]:
        return {"image": rng.integers(0, 256, (1, spec.stack, spec.height, spec.width), dtype=np.uint8),
                "state": rng.standard_normal((1, spec.state_dim)).astype(np.float32)}

    buf.start_episode(obs())
    for i in range(fill):
        end = (i + 1) % episode_len == 0
        buf.add(rng.uniform(-1, 1, (1, spec.action_dim)).astype(np.float32), rng.standard_normal(1).astype(np.float32),
                obs(), np.array([end]), np.zeros(1, dtype=bool))
        if end:
            buf.start_episode(obs())
    return buf


def _updater(agent: TD3, buf: ReplayBuffer, device: torch.device) -> Callable[[int], float]:
    """``run(n)`` → seconds for n × (sample + update), including one monitor flush per call (the training loop
    flushes every ``trainer.log_every`` steps)."""
    a = agent.cfg
    step = [0]

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step[0] += 1
            agent.update(buf.sample(a.batch_size, a.n_step, a.gamma), step[0])
        agent.monitor.flush(step[0])
        _sync(device)
        return time.perf_counter() - start

    return run


def our_updater(cfg: BenchConfig, device: torch.device, encoder: str, monitor: bool,
                compile: bool = False) -> Callable[[int], float]:
    """Our agent at the fixed sizes of ``cfg`` (the secondary rows); see :func:`_updater`."""
    from av_td3.agent.td3 import TD3, Spec
    from av_td3.config import MonitorConfig
    from av_td3.envs.base import ACTION_NAMES, state_scale

    spec = Spec(stack=cfg.stack, height=cfg.height, width=cfg.width, state_dim=_state_dim(cfg), action_dim=2,
                state_scale=state_scale(cfg.lane_points, 4.0), action_names=ACTION_NAMES)
    agent_cfg = _agent_config(cfg, encoder)
    agent_cfg.compile = compile
    agent = TD3(agent_cfg, MonitorConfig(enabled=monitor), spec, device, q_bound=1e9, seed=cfg.seed)
    return _updater(agent, random_buffer(spec, cfg.fill, cfg.seed, device), device)


def default_updater(cfg: BenchConfig, device: torch.device, monitor: bool | None = None) -> Callable[[int], float]:
    """The agent the trainer builds from the default configuration (its Spec from the env config by
    :func:`av_td3.train.agent_spec`, its Q bound from :mod:`av_td3.bounds`); ``monitor`` overrides
    ``monitor.enabled``. See :func:`_updater`."""
    from av_td3 import bounds
    from av_td3.agent.td3 import TD3
    from av_td3.train import agent_spec

    conf = default_config(cfg.overrides)
    if monitor is not None:
        conf.monitor.enabled = monitor
    spec = agent_spec(conf.env)
    agent = TD3(conf.agent, conf.monitor, spec, device, bounds.q_bound(conf), seed=conf.seed)
    return _updater(agent, random_buffer(spec, max(cfg.fill, conf.agent.batch_size), cfg.seed, device), device)


def matmul_runner(size: int, device: torch.device) -> Callable[[int], float]:
    """``run(n)`` → seconds for n float32 matmuls of two ``size`` x ``size`` matrices (2 size³ FLOP each): the
    machine's dense compute rate, the limit an update (mostly convolutions and matmuls) is held to."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    c = torch.empty(size, size, device=device)

    def run(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b, out=c)
        _sync(device)
        return time.perf_counter() - start

    return run


def matmul_flop(size: int) -> float:
    return 2.0 * size ** 3


def count_flop(run: Callable[[int], float], updates: int) -> float:
    """FLOP per update, counted by torch's ``FlopCounterMode`` over ``updates`` updates (one critic+actor cycle:
    ``agent.policy_freq`` critic updates, one of them with the actor and target step) and averaged."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run(updates)
    return counter.get_total_flops() / updates


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
    "default": ("{default}", lambda c, d: default_updater(c, d)),
    "default_monitor_off": ("{sizes}, monitor.enabled=false", lambda c, d: default_updater(c, d, monitor=False)),
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
        _, build = UPDATE_ROWS[name]
        try:
            runners[name] = build(cfg, device)
        except ImportError:
            if name != "sb3":
                raise
            result.skipped[f"update/{name}"] = SB3_MISSING
            say(SB3_MISSING)
    conf = default_config(cfg.overrides) if any(n.startswith("default") for n in runners) else None
    policy_freq = {name: (conf.agent.policy_freq if name.startswith("default")
                          else _agent_config(cfg, "separate").policy_freq) for name in runners}
    matmul = f"sgemm_{cfg.matmul_size}"
    say(f"updates: {', '.join(runners)} x {cfg.update_reps} reps of {cfg.updates_per_rep} (interleaved, with "
        f"{cfg.updates_per_rep} {cfg.matmul_size}x{cfg.matmul_size} float32 matmuls)")
    with _quiet("av_td3.agent.monitor"):
        # counted before the timed reps (the counter slows every op); a compiled encoder is not counted
        flop = {name: None if name.endswith("_compile") else count_flop(run, policy_freq[name])
                for name, run in runners.items()}
        rates, cpu_rates = interleave({**runners, matmul: matmul_runner(cfg.matmul_size, device)},
                                      cfg.update_reps, cfg.updates_per_rep, cfg.warmup_updates)
    gflop = matmul_flop(cfg.matmul_size) / 1e9
    matmul_rate = [r * gflop for r in rates.pop(matmul)]           # GFLOP/s, one per rep
    matmul_cpu = [r * gflop for r in cpu_rates.pop(matmul)]
    labels = {} if conf is None else {"default": describe_default(conf), "sizes": describe_default(conf, False)}
    for name, values in rates.items():
        f = flop[name]
        fraction = None if f is None else paired_ratio([v * f / 1e9 for v in values], matmul_rate)
        result.rows.append(Row(f"update/{name}", "updates/s", values, UPDATE_ROWS[name][0].format(**labels),
                               cpu_rates[name], flop_per_update=f, matmul_fraction=fraction))
    result.rows.append(Row(f"matmul/{matmul}", "GFLOP/s", matmul_rate,
                           f"torch.mm of two {cfg.matmul_size}x{cfg.matmul_size} float32 matrices on {device}, "
                           "interleaved with the update rows: the rate the updates' fractions are of", matmul_cpu))
    if "default" in rates:
        say(f"update at the default configuration: {statistics.median(rates['default']):.1f} updates/s, "
            f"{flop['default'] / 1e9:.2f} GFLOP/update, {statistics.median(matmul_rate):.1f} GFLOP/s matmul rate")


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
    """The default configuration's training run (``out/e2e_default``, with the phase breakdown of its training
    steps), SB3's ``learn()`` on the same env and sizes right after it, then short runs at the fixed sizes on
    ``out/e2e_run[_num_envs_N]``, one per ``e2e_num_envs``; env steps/s of each log interval after learning
    starts."""
    _bench_e2e_default(cfg, out / "e2e_default", result, say)
    for n in cfg.e2e_num_envs:
        suffix = "" if n == 1 else f"_num_envs_{n}"
        rates, wall = _e2e_run(cfg, out / f"e2e_run{suffix}", n)
        result.rows.append(Row(f"e2e/steps_per_s{suffix}", "env steps/s", rates,
                               f"Trainer, agent.encoder={cfg.e2e_encoder}, monitor on, env.npcs={cfg.npcs}, "
                               f"env.num_envs={n}, 1 update per env step after learning_starts="
                               f"{cfg.e2e_learning_starts}; one value per log interval (run wall time {wall:.0f} s "
                               "incl. start-up and final eval)"))
        say(f"e2e (env.num_envs={n}): {statistics.median(rates):.1f} env steps/s while training")


def default_e2e_config(cfg: BenchConfig) -> Config:
    """The default configuration, shortened to a bench run: learning starts at ``max(e2e_learning_starts, batch
    size)`` (the trainer updates only once the buffer holds a batch) rounded up to a multiple of
    ``e2e_log_every``, followed by ``e2e_total_steps - e2e_learning_starts`` learning steps (rounded likewise);
    episodes of at most ``e2e_max_episode_steps``; a replay buffer just big enough; no evaluation or checkpoint
    before the end; the CSV logger only. Everything the update and the env step do stays as configured."""
    from av_td3.config import CsvConfig, LoggerConfig

    conf = default_config(cfg.overrides)
    every = cfg.e2e_log_every
    starts = math.ceil(max(cfg.e2e_learning_starts, conf.agent.batch_size) / every) * every
    total = starts + math.ceil(max(cfg.e2e_total_steps - cfg.e2e_learning_starts, every) / every) * every
    conf.trainer = dataclasses.replace(
        conf.trainer, total_steps=total, learning_starts=starts, eval_every=total * 10, eval_episodes=1,
        checkpoint_every=total * 10, checkpoint_buffer=False, log_every=every, device=str(cfg.device),
        resume="none", torch_threads=torch.get_num_threads(), progress=False)
    conf.agent.buffer_size = max(total + 10, conf.agent.batch_size)
    conf.env.max_episode_steps = cfg.e2e_max_episode_steps
    conf.logger = LoggerConfig(csv=CsvConfig())
    return conf


def _bench_e2e_default(cfg: BenchConfig, run_dir: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    from av_td3.timing import PhaseTimer

    conf = default_e2e_config(cfg)
    t = conf.trainer
    timer = PhaseTimer(torch.device(cfg.device), start_step=t.learning_starts)
    rates, wall = _train(conf, run_dir, timer)
    window = f"env steps {t.learning_starts}-{t.total_steps}, log intervals of {t.log_every}"
    result.rows.append(Row("e2e/default", "env steps/s", rates,
                           f"Trainer, {describe_default(conf)}, env.npcs={conf.env.npcs}, "
                           f"env.max_episode_steps={conf.env.max_episode_steps}; {window} (run wall time "
                           f"{wall:.0f} s incl. start-up, random steps and final eval)"))
    result.breakdown = phase_breakdown(timer)
    result.config["e2e_default"] = {**default_sizes(conf), "learning_starts": t.learning_starts,
                                    "total_steps": t.total_steps, "log_every": t.log_every}
    say(f"e2e at the default configuration: {statistics.median(rates):.1f} env steps/s while training")
    try:
        sb3_rates, sb3_wall = sb3_learn(conf, torch.device(cfg.device))
    except ImportError:
        result.skipped["e2e/default_sb3"] = SB3_MISSING
        say(SB3_MISSING)
        return
    result.rows.append(Row("e2e/default_sb3", "env steps/s", sb3_rates,
                           f"stable-baselines3 TD3.learn(), MultiInputPolicy on av_td3/Highway-v0, same sizes "
                           f"(NatureCNN features {conf.agent.features_dim}, shared extractor), train_freq=1, "
                           f"gradient_steps={conf.trainer.updates_per_step}; {window} (wall time {sb3_wall:.0f} s)"))
    say(f"e2e SB3 learn(): {statistics.median(sb3_rates):.1f} env steps/s while training")


def phase_breakdown(timer: PhaseTimer) -> dict[str, Any]:
    """A :class:`av_td3.timing.PhaseTimer`'s totals as milliseconds per training step and shares of the step
    (the phases in :data:`NOT_PER_STEP` are reported apart, in seconds over the window)."""
    steps = max(timer.steps, 1)
    per_step = {k: v for k, v in timer.seconds.items() if k not in NOT_PER_STEP}
    total = sum(per_step.values())
    return {"steps": timer.steps, "ms_per_step": 1e3 * total / steps,
            "phases": {k: {"ms_per_step": 1e3 * v / steps, "share": v / total if total > 0 else 0.0}
                       for k, v in per_step.items()},
            "not_per_step_s": {k: v for k, v in timer.seconds.items() if k in NOT_PER_STEP}}


def _gym_kwargs(env_cfg: Any) -> dict[str, Any]:
    """``gymnasium.make("av_td3/Highway-v0", **kwargs)`` arguments for ``env_cfg``: the fields that differ from the
    schema's defaults (the embedded simulator's; nested configs as dicts)."""
    from av_td3.config import EnvConfig

    schema = EnvConfig()
    kwargs = {}
    for f in dataclasses.fields(env_cfg):
        value = getattr(env_cfg, f.name)
        if f.name not in ("camera", "route") and value != getattr(schema, f.name):  # CARLA only
            kwargs[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return kwargs


def sb3_learn(conf: Config, device: torch.device) -> tuple[list[float], float]:
    """Stable-Baselines3's ``TD3.learn()`` on ``gymnasium.make("av_td3/Highway-v0")`` with ``conf``'s env and
    sizes: ``MultiInputPolicy`` (NatureCNN on the image with ``features_dim`` outputs, the state flattened next to
    it), ``net_arch`` = our hidden layers, one extractor shared by actor and critic, batch size, learning rate,
    tau, gamma, policy delay, target noise and Gaussian exploration noise as ours, one gradient step per env step
    after ``learning_starts`` random steps. Returns env steps/s of each ``log_every`` steps after learning starts
    (the same windows as ours) and the wall time of ``learn()``. Raises ImportError without SB3."""
    import gymnasium as gym
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.noise import NormalActionNoise

    from av_td3.envs import HIGHWAY_ID

    a, t = conf.agent, conf.trainer
    env = gym.make(HIGHWAY_ID, disable_env_checker=True, **_gym_kwargs(conf.env))
    model = SB3TD3(
        "MultiInputPolicy", env, learning_rate=a.lr.critic, buffer_size=a.buffer_size,
        learning_starts=t.learning_starts, batch_size=a.batch_size, tau=a.tau, gamma=a.gamma, train_freq=1,
        gradient_steps=t.updates_per_step, policy_delay=a.policy_freq, target_policy_noise=a.policy_noise,
        target_noise_clip=a.noise_clip, seed=conf.seed, device=device,
        action_noise=NormalActionNoise(np.zeros(2), np.full(2, a.exploration_noise)),
        policy_kwargs=dict(net_arch=[a.hidden_dim] * a.hidden_layers,
                           features_extractor_kwargs=dict(cnn_output_dim=a.features_dim),
                           share_features_extractor=True))
    model.set_logger(Logger(folder=None, output_formats=[]))  # records in memory only: no files
    stamps: dict[int, float] = {}

    class Stamps(BaseCallback):
        def _on_step(self) -> bool:  # called after each env step, before that step's gradient step
            if self.num_timesteps % t.log_every == 0:
                stamps[self.num_timesteps] = time.perf_counter()
            return True

    start = time.perf_counter()
    with _quiet("av_td3.envs"):
        model.learn(total_timesteps=t.total_steps, callback=Stamps())
    wall = time.perf_counter() - start
    env.close()
    ends = range(t.learning_starts + t.log_every, t.total_steps + 1, t.log_every)
    return [t.log_every / (stamps[s] - stamps[s - t.log_every]) for s in ends], wall


def _e2e_run(cfg: BenchConfig, run_dir: Path, num_envs: int) -> tuple[list[float], float]:
    from av_td3.config import Config, CsvConfig, LoggerConfig, MonitorConfig, TrainerConfig, to_config

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
    return _train(conf, run_dir)


def _train(conf: Config, run_dir: Path, timer: PhaseTimer | None = None) -> tuple[list[float], float]:
    """Train ``conf`` in ``run_dir`` (charging its phases to ``timer`` if given); return the trainer's
    ``perf/steps_per_s`` of each log interval that lies wholly after ``learning_starts`` and the wall time."""
    import csv

    from av_td3.train import Trainer

    t = conf.trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _quiet("av_td3.agent.monitor", "av_td3.train"):
        trainer = Trainer(conf, run_dir)
        if timer is not None:
            trainer.time_phases(timer)
        trainer.train()
    wall = time.perf_counter() - start
    rates = []
    with open(run_dir / "scalars.csv", newline="") as f:
        for row in csv.DictReader(f):
            # An interval ending after learning_starts + log_every lies wholly in the updating phase.
            if row["tag"] == "perf/steps_per_s" and int(row["step"]) >= t.learning_starts + t.log_every:
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
    pair("default_monitor_off", "default", "default_monitor_overhead_pct", overhead)
    for name in rows:
        fraction = rows[name].matmul_fraction
        if name.startswith("update/") and fraction is not None:
            ratios[f"{name.removeprefix('update/')}_update_matmul_fraction"] = fraction
    med = {r.name: r.median for r in result.rows}
    if "e2e/default" in med:
        ratios["default_e2e_steps_per_s"] = med["e2e/default"]
        if "e2e/default_sb3" in med:  # two runs one after the other: medians, not pairs
            ratios["default_e2e_vs_sb3"] = med["e2e/default"] / med["e2e/default_sb3"]
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
             "Headline rows (`default`): the shipped configuration"
             + (f" with {' '.join(c['overrides'])}" if c.get("overrides") else "") + ". "
             f"Secondary rows' sizes: batch {c['batch_size']}, image {c['stack']}x{c['height']}x{c['width']}, "
             f"features_dim {c['features_dim']}, hidden {c['hidden_layers']}x{c['hidden_dim']}; "
             f"{'quick' if c['quick'] else 'full'} run. Update rows: {c['update_reps']} interleaved reps of "
             f"{c['updates_per_rep']} updates.", "",
             "| row | median | unit | min | max | reps | per CPU-second | GFLOP/update | % of matmul rate | what |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result.rows:
        cpu = "" if r.cpu_values is None else _fmt(statistics.median(r.cpu_values))
        gflop = "" if r.flop_per_update is None else f"{r.flop_per_update / 1e9:.3g}"
        pct = "" if r.matmul_fraction is None else f"{100 * r.matmul_fraction:.0f}%"
        lines.append(f"| {r.name} | {_fmt(r.median)} | {r.unit} | {_fmt(min(r.values))} | {_fmt(max(r.values))} "
                     f"| {len(r.values)} | {cpu} | {gflop} | {pct} | {r.note} |")
    for name, why in result.skipped.items():
        lines.append(f"| {name} | skipped | | | | | | | | {why} |")
    lines += breakdown_markdown(result.breakdown)
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


def breakdown_markdown(breakdown: dict[str, Any]) -> list[str]:
    """The phase breakdown of ``e2e/default``'s training steps as markdown lines (none without it)."""
    if not breakdown:
        return []
    lines = ["", f"Where a training step of `e2e/default` goes ({breakdown['steps']} steps after learning_starts, "
                 f"{breakdown['ms_per_step']:.1f} ms per step):", "",
             "| phase | ms per step | share |", "|---|---:|---:|"]
    for name, p in sorted(breakdown["phases"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        lines.append(f"| {name} | {p['ms_per_step']:.2f} | {100 * p['share']:.1f}% |")
    for name, seconds in breakdown["not_per_step_s"].items():
        lines.append(f"| {name} (once, not in the shares) | {seconds:.2f} s in all | |")
    return lines


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
