"""``e2e/*`` rows: environment steps per second of short real training runs (:class:`av_td3.train.Trainer`:
acting, stepping, storing, sampling, updating), measured over the trainer's own log intervals after
``learning_starts``; ``e2e/default`` with the phase breakdown of its training steps, SB3's ``TD3.learn()`` on the
same env and sizes right after it (``e2e/default_sb3``), then runs at the fixed sizes, one per
``BenchConfig.e2e_num_envs``."""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from av_td3.bench.config import (BenchConfig, bench_trainer, default_config, default_sizes, describe_default,
                                 fixed_config)
from av_td3.bench.machine import quiet
from av_td3.bench.result import SB3_MISSING, BenchResult, Row
from av_td3.bench.sb3 import sb3_learn
from av_td3.rundir import DEFAULT_SCALARS_FILE

if TYPE_CHECKING:
    from av_td3.config import Config
    from av_td3.timing import PhaseTimer

# Phases of a training step that run once per run rather than per step (the final evaluation and checkpoint fall
# in the timed window): listed next to the breakdown, not in its shares.
NOT_PER_STEP = ("eval_checkpoint",)


def bench_run(conf: Config, cfg: BenchConfig, total: int, starts: int) -> Config:
    """``conf`` as a bench run of ``total`` env steps, learning from ``starts``: logged every ``e2e_log_every``
    steps to CSV only, no evaluation or checkpoint before the end, on the bench's device and torch threads.
    Everything the update and the env step do stays as configured. Validated."""
    big = total * 10
    return bench_trainer(conf, cfg, total_steps=total, learning_starts=starts, eval_every=big, eval_episodes=1,
                         checkpoint_every=big, checkpoint_buffer=False, log_every=cfg.e2e_log_every)


def default_e2e_config(cfg: BenchConfig) -> Config:
    """The default configuration, shortened to a bench run (:func:`bench_run`): learning starts at
    ``max(e2e_learning_starts, batch size)`` (the trainer updates only once the buffer holds a batch) rounded up
    to a multiple of ``e2e_log_every``, followed by ``e2e_total_steps - e2e_learning_starts`` learning steps
    (rounded likewise); episodes of at most ``e2e_max_episode_steps``; a replay buffer just big enough."""
    conf = default_config(cfg.overrides)
    every = cfg.e2e_log_every
    starts = math.ceil(max(cfg.e2e_learning_starts, conf.agent.batch_size) / every) * every
    total = starts + math.ceil(max(cfg.e2e_total_steps - cfg.e2e_learning_starts, every) / every) * every
    conf.agent.buffer_size = max(total + 10, conf.agent.batch_size)
    conf.env.max_episode_steps = cfg.e2e_max_episode_steps
    return bench_run(conf, cfg, total, starts)


def fixed_e2e_config(cfg: BenchConfig, num_envs: int) -> Config:
    """A bench run (:func:`bench_run`) at the fixed sizes with ``agent.encoder=e2e_encoder``, monitor on,
    ``env.num_envs=num_envs``: ``e2e_total_steps`` steps, learning from ``e2e_learning_starts``."""
    conf = fixed_config(cfg, cfg.e2e_encoder, buffer_size=cfg.e2e_total_steps + 10,
                        max_episode_steps=cfg.e2e_max_episode_steps, num_envs=num_envs)
    return bench_run(conf, cfg, cfg.e2e_total_steps, cfg.e2e_learning_starts)


def train_run(conf: Config, run_dir: Path, timer: PhaseTimer | None = None) -> tuple[list[float], float]:
    """Train ``conf`` in ``run_dir`` (charging its phases to ``timer`` if given); return the trainer's
    ``perf/steps_per_s`` of each log interval that lies wholly after ``learning_starts`` and the wall time (s)."""
    from av_td3.train import Trainer

    t = conf.trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with quiet("av_td3.agent.monitor", "av_td3.train"):
        trainer = Trainer(conf, run_dir)
        if timer is not None:
            trainer.time_phases(timer)
        trainer.train()
    wall = time.perf_counter() - start
    rates = [rate for _, rate in learning_intervals(run_dir / DEFAULT_SCALARS_FILE, t.learning_starts, t.log_every)]
    return rates, wall


def learning_intervals(scalars_csv: Path, learning_starts: int, log_every: int) -> list[tuple[int, float]]:
    """The log intervals of a run's ``scalars.csv`` (format ``step,tag,value``) that lie wholly after
    ``learning_starts``: (env steps in the interval, the trainer's ``perf/steps_per_s`` over it), in step order.
    Raises RuntimeError when there are none."""
    logged = []
    with open(scalars_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["tag"] == "perf/steps_per_s":
                logged.append((int(row["step"]), float(row["value"])))
    logged.sort()
    intervals = []
    for (prev, _), (step, rate) in zip([(0, 0.0)] + logged, logged):
        # An interval ending after learning_starts + log_every lies wholly in the updating phase.
        if step >= learning_starts + log_every:
            intervals.append((step - prev, rate))
    if not intervals:
        raise RuntimeError(f"{scalars_csv}: no perf/steps_per_s logged after learning_starts={learning_starts} + "
                           f"log_every={log_every}")
    return intervals


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


def bench_e2e(cfg: BenchConfig, out: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    """The default configuration's training run (``out/e2e_default``, with the phase breakdown of its training
    steps), SB3's ``learn()`` on the same env and sizes right after it, then short runs at the fixed sizes on
    ``out/e2e_run[_num_envs_N]``, one per ``e2e_num_envs``; env steps/s of each log interval after learning
    starts."""
    _bench_e2e_default(cfg, out / "e2e_default", result, say)
    for n in cfg.e2e_num_envs:
        suffix = "" if n == 1 else f"_num_envs_{n}"
        rates, wall = train_run(fixed_e2e_config(cfg, n), out / f"e2e_run{suffix}")
        result.rows.append(Row(f"e2e/steps_per_s{suffix}", "env steps/s", rates,
                               f"Trainer, agent.encoder={cfg.e2e_encoder}, monitor on, env.npcs={cfg.npcs}, "
                               f"env.num_envs={n}, 1 update per env step after learning_starts="
                               f"{cfg.e2e_learning_starts}; one value per log interval (run wall time {wall:.0f} s "
                               "incl. start-up and final eval)"))
        say(f"e2e (env.num_envs={n}): {statistics.median(rates):.1f} env steps/s while training")


def _bench_e2e_default(cfg: BenchConfig, run_dir: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    from av_td3.timing import PhaseTimer

    conf = default_e2e_config(cfg)
    t = conf.trainer
    timer = PhaseTimer(torch.device(cfg.device), start_step=t.learning_starts)
    rates, wall = train_run(conf, run_dir, timer)
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
