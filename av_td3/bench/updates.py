"""``update/*`` and ``matmul/*`` rows: TD3 updates per second (one replay sample + one critic update, + every
``policy_freq`` an actor and target update), ours next to SB3's, interleaved with a float32 matmul whose rate
each update row is held to (FLOP per update counted by torch).

Our agents are built as the trainer builds them: a training :class:`av_td3.config.Config` (the shipped default,
or the fixed sizes of :func:`av_td3.bench.config.fixed_config`) → Spec by :func:`av_td3.train.agent_spec`, Q bound
by :func:`av_td3.bounds.q_bound`. ``update/default_bf16`` is the default update with ``agent.precision=bf16``
(the CNN encoder under bfloat16 autocast), an opt-in lever measured next to the float32 default.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from av_td3.bench.config import BenchConfig, default_config, describe_default, fixed_config
from av_td3.bench.machine import quiet, sync
from av_td3.bench.result import SB3_MISSING, BenchResult, Row, RowSkipped, paired_ratio
from av_td3.bench.sb3 import sb3_updater

if TYPE_CHECKING:  # built lazily: `av-td3 bench --only replay` builds no agent
    from av_td3.agent.td3 import TD3, Spec
    from av_td3.config import Config
    from av_td3.replay import ReplayBuffer

Runner = Callable[[int], float]  # run(n) → wall seconds for n updates (or n matmuls)


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


def build_agent(conf: Config, device: torch.device) -> TD3:
    """The TD3 agent the trainer builds from ``conf``: its shapes from the env config, its Q bound from the
    reward bound, its seed from the run's."""
    from av_td3 import bounds
    from av_td3.agent.td3 import TD3
    from av_td3.train import agent_spec

    return TD3(conf.agent, conf.monitor, agent_spec(conf.env), device, bounds.q_bound(conf), seed=conf.seed)


def agent_updater(conf: Config, fill: int, seed: int, device: torch.device) -> Runner:
    """``run(n)`` → seconds for n × (sample + update) of :func:`build_agent`'s agent on a buffer of ``fill``
    random transitions (at least a batch), including one monitor flush per call (the training loop flushes every
    ``trainer.log_every`` steps)."""
    agent = build_agent(conf, device)
    buf = random_buffer(agent.spec, max(fill, conf.agent.batch_size), seed, device)
    a = agent.cfg
    step = [0]

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step[0] += 1
            agent.update(buf.sample(a.batch_size, a.n_step, a.gamma), step[0])
        agent.monitor.flush(step[0])
        sync(device)
        return time.perf_counter() - start

    return run


def our_updater(cfg: BenchConfig, device: torch.device, encoder: str, monitor: bool,
                compile: bool = False) -> Runner:
    """Our agent at the fixed sizes of ``cfg`` (the secondary rows); see :func:`agent_updater`."""
    conf = fixed_config(cfg, encoder, monitor=monitor, compile=compile)
    return agent_updater(conf, cfg.fill, cfg.seed, device)


def default_updater(cfg: BenchConfig, device: torch.device, monitor: bool | None = None) -> Runner:
    """The agent the trainer builds from the default configuration (``cfg.overrides`` applied); ``monitor``
    overrides ``monitor.enabled``. See :func:`agent_updater`."""
    conf = default_config(cfg.overrides)
    if monitor is not None:
        conf.monitor.enabled = monitor
    return agent_updater(conf, cfg.fill, cfg.seed, device)


def bf16_unsupported(device: torch.device) -> str | None:
    """Why bfloat16 autocast cannot run on ``device`` (None: it can). Tried on a small conv + linear forward and
    backward, since torch answers an unsupported dtype with a warning and plain float32, not an error."""
    if not torch.amp.is_autocast_available(device.type):
        return f"torch.autocast has no {device.type} backend in torch {torch.__version__}"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)).to(device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = net(torch.rand(2, 2, 8, 8, device=device))
            out.float().sum().backward()
    except RuntimeError as err:
        return f"bfloat16 autocast failed on {device}: {err}"
    if out.dtype != torch.bfloat16:
        why = "; ".join(str(w.message) for w in caught) or f"it computed in {out.dtype}"
        return f"bfloat16 autocast is not supported on {device}: {why}"
    return None


def default_bf16_updater(cfg: BenchConfig, device: torch.device) -> Runner:
    """:func:`default_updater` with ``agent.precision=bf16``: the CNN encoder (the convolutions, most of the FLOP)
    under bfloat16 autocast (AMX / AVX512-BF16 on recent Xeons, tensor cores on GPUs); heads, gradients and Adam
    state in float32. Raises :class:`RowSkipped` where bf16 autocast is unsupported."""
    why = bf16_unsupported(device)
    if why is not None:
        raise RowSkipped(why)
    conf = default_config(cfg.overrides)
    conf.agent.precision = "bf16"
    return agent_updater(conf, cfg.fill, cfg.seed, device)


def matmul_runner(size: int, device: torch.device) -> Runner:
    """``run(n)`` → seconds for n float32 matmuls of two ``size`` x ``size`` matrices (2 size³ FLOP each): the
    machine's dense compute rate, the limit an update (mostly convolutions and matmuls) is held to."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    c = torch.empty(size, size, device=device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b, out=c)
        sync(device)
        return time.perf_counter() - start

    return run


def matmul_flop(size: int) -> float:
    """FLOP of one ``size`` x ``size`` matmul (a multiply and an add per inner-product term)."""
    return 2.0 * size ** 3


def count_flop(run: Runner, updates: int) -> float:
    """FLOP per update, counted by torch's ``FlopCounterMode`` over ``updates`` updates (one critic+actor cycle:
    ``agent.policy_freq`` critic updates, one of them with the actor and target step) and averaged."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run(updates)
    return counter.get_total_flops() / updates


# name -> (the row's note, a format string over the labels of bench_updates; its builder)
UPDATE_ROWS: dict[str, tuple[str, Callable[[BenchConfig, torch.device], Runner]]] = {
    "default": ("{default}", lambda c, d: default_updater(c, d)),
    "default_bf16": ("{default}, agent.precision=bf16 (the CNN under bfloat16 autocast; opt-in)",
                     default_bf16_updater),
    "default_monitor_off": ("{sizes}, monitor.enabled=false", lambda c, d: default_updater(c, d, monitor=False)),
    "ours_separate": ("agent.encoder=separate, monitor on", lambda c, d: our_updater(c, d, "separate", True)),
    "ours_separate_monitor_off": ("agent.encoder=separate, monitor.enabled=false",
                                  lambda c, d: our_updater(c, d, "separate", False)),
    "ours_shared": ("agent.encoder=shared, monitor on", lambda c, d: our_updater(c, d, "shared", True)),
    "ours_shared_monitor_off": ("agent.encoder=shared, monitor.enabled=false",
                                lambda c, d: our_updater(c, d, "shared", False)),
    "ours_separate_compile": ("agent.encoder=separate, monitor on, agent.compile=true (compiled during warm-up)",
                              lambda c, d: our_updater(c, d, "separate", True, compile=True)),
    "sb3": ("stable-baselines3 TD3.train(), CnnPolicy", sb3_updater),
}


def interleave(runners: dict[str, Runner], reps: int, n: int,
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


def _build(cfg: BenchConfig, device: torch.device, result: BenchResult,
           say: Callable[[str], None]) -> dict[str, Runner]:
    """The runners of ``cfg.update_rows``; a row that cannot run here goes into ``result.skipped``."""
    runners: dict[str, Runner] = {}
    for name in cfg.update_rows:
        _, build = UPDATE_ROWS[name]
        try:
            runners[name] = build(cfg, device)
        except ImportError:
            if name != "sb3":
                raise
            result.skipped[f"update/{name}"] = SB3_MISSING
            say(SB3_MISSING)
        except RowSkipped as why:
            result.skipped[f"update/{name}"] = str(why)
            say(f"update/{name} skipped: {why}")
    return runners


def bench_updates(cfg: BenchConfig, device: torch.device, result: BenchResult, say: Callable[[str], None]) -> None:
    """The ``update/*`` rows of ``cfg.update_rows`` and ``matmul/sgemm_<n>``, appended to ``result``."""
    runners = _build(cfg, device, result, say)
    conf = default_config(cfg.overrides) if any(n.startswith("default") for n in runners) else None
    fixed_policy_freq = fixed_config(cfg).agent.policy_freq
    policy_freq = {name: conf.agent.policy_freq if conf is not None and name.startswith("default")
                   else fixed_policy_freq for name in runners}
    matmul = f"sgemm_{cfg.matmul_size}"
    say(f"updates: {', '.join(runners)} x {cfg.update_reps} reps of {cfg.updates_per_rep} (interleaved, with "
        f"{cfg.updates_per_rep} {cfg.matmul_size}x{cfg.matmul_size} float32 matmuls)")
    with quiet("av_td3.agent.monitor"):
        # counted before the timed reps (the counter slows every op); a compiled encoder is not counted
        flop = {name: None if name.endswith("_compile") else count_flop(run, policy_freq[name])
                for name, run in runners.items()}
        rates, cpu_rates = interleave({**runners, matmul: matmul_runner(cfg.matmul_size, device)},
                                      cfg.update_reps, cfg.updates_per_rep, cfg.warmup_updates)
    gflop = matmul_flop(cfg.matmul_size) / 1e9
    matmul_rate = [r * gflop for r in rates.pop(matmul)]           # GFLOP/s, one per rep
    matmul_cpu = [r * gflop for r in cpu_rates.pop(matmul)]
    labels = {"device": device.type}
    if conf is not None:
        labels.update(default=describe_default(conf), sizes=describe_default(conf, False))
    for name, values in rates.items():
        f = flop[name]
        fraction = None if f is None else paired_ratio([v * f / 1e9 for v in values], matmul_rate)
        result.rows.append(Row(f"update/{name}", "updates/s", values, UPDATE_ROWS[name][0].format(**labels),
                               cpu_rates[name], flop_per_update=f, matmul_fraction=fraction))
    result.rows.append(Row(f"matmul/{matmul}", "GFLOP/s", matmul_rate,
                           f"torch.mm of two {cfg.matmul_size}x{cfg.matmul_size} float32 matrices on {device}, "
                           "interleaved with the update rows: the rate the updates' fractions are of", matmul_cpu))
    if "default" in rates:
        default_flop = flop["default"]
        assert default_flop is not None  # counted: only the compiled runners' are not
        say(f"update at the default configuration: {statistics.median(rates['default']):.1f} updates/s, "
            f"{default_flop / 1e9:.2f} GFLOP/update, {statistics.median(matmul_rate):.1f} GFLOP/s matmul rate")
