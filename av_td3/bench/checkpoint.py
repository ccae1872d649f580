"""``checkpoint/*`` rows: what a checkpoint at the default configuration costs the training loop, with a full replay
buffer of the default size (``trainer.checkpoint_buffer=true`` by default: the buffer is in every checkpoint).

A real :class:`av_td3.train.Trainer` is built on ``out/checkpoint_default``, its buffer filled to capacity by
cycling rendered observations of its own env, its agent updated (so the optimizers hold their state, as in a run);
then, after one untimed checkpoint, each repetition calls ``save_checkpoint()`` as the loop does: the time until
it returns is what the loop waits for (copies of the agent's tensors and of the buffer's filled rows), the time
until the file is complete adds the compression and the write, which run in a background thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from av_td3.bench.config import BenchConfig, bench_trainer, default_config, describe_default
from av_td3.bench.machine import quiet
from av_td3.bench.result import BenchResult, Row

if TYPE_CHECKING:
    from av_td3.config import Config
    from av_td3.train import Trainer


def checkpoint_config(cfg: BenchConfig) -> Config:
    """The default configuration (with ``cfg.overrides``) as the bench's trainer: a fresh run (no resume), CSV
    logging only, the bench's device and torch threads; ``agent.buffer_size`` from ``cfg.checkpoint_buffer_size``
    when given (the tests' tiny runs), else the configuration's own. Validated."""
    conf = default_config(cfg.overrides)
    if cfg.checkpoint_buffer_size is not None:
        conf.agent.buffer_size = cfg.checkpoint_buffer_size
    return bench_trainer(conf, cfg)


def record_env_steps(trainer: Trainer, steps: int, seed: int) -> tuple[dict, list[tuple[Any, ...]]]:
    """The initial observation of every env, and ``steps`` vector steps of the trainer's envs with uniform random
    actions, as ``(action, reward, next_obs, terminated, truncated, restart_obs)``; ``restart_obs`` holds the first
    observations of the episodes started where one ended (None when none did)."""
    rng = np.random.default_rng(seed)
    n, a = trainer.n, trainer.spec.action_dim
    obs, _ = trainer.envs.reset(seed=[seed + i for i in range(n)])
    recorded: list[tuple[Any, ...]] = []
    for i in range(steps):
        action = rng.uniform(-1.0, 1.0, size=(n, a)).astype(np.float32)
        next_obs, reward, term, trunc, _ = trainer.envs.step(action)
        ended = term | trunc
        restart = None
        if ended.any():
            seeds = [seed + n * (i + 1) + j if e else None for j, e in enumerate(ended)]
            restart, _ = trainer.envs.reset(seed=seeds, options={"reset_mask": ended})
        recorded.append((action, reward.astype(np.float32), next_obs, term, trunc, restart))
    return obs, recorded


def fill_buffer(trainer: Trainer, recorded: tuple[dict, list[tuple[Any, ...]]]) -> None:
    """Fill the trainer's replay buffer to capacity with the recorded steps, cycled, stored as the loop stores
    them (one row per env per step: ``rows_per_env`` steps wrap every stream)."""
    buf = trainer.buffer
    assert buf is not None  # the default agent (td3) learns from a replay buffer
    first, steps = recorded
    buf.start_episode(first)
    for i in range(buf.rows_per_env):
        action, reward, next_obs, term, trunc, restart = steps[i % len(steps)]
        buf.add(action, reward, next_obs, term, trunc)
        ended = term | trunc
        if ended.any():
            buf.start_episode({k: v[ended] for k, v in restart.items()}, np.flatnonzero(ended))


def bench_checkpoint(cfg: BenchConfig, out: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    """The ``checkpoint/*`` rows, appended to ``result``: ``checkpoint_reps`` checkpoints of a trainer at the
    default configuration with a full replay buffer, written into ``out/checkpoint_default``."""
    from av_td3.train import Trainer

    conf = checkpoint_config(cfg)
    a = conf.agent
    run_dir = out / "checkpoint_default"
    run_dir.mkdir(parents=True, exist_ok=True)
    with quiet("av_td3.agent.monitor", "av_td3.train"):
        trainer = Trainer(conf, run_dir)
        buffer = trainer.buffer
        try:
            assert buffer is not None  # the default agent (td3) learns from a replay buffer
            fill_buffer(trainer, record_env_steps(trainer, cfg.checkpoint_env_steps, cfg.seed))
            for _ in range(a.policy_freq):  # the optimizers' state exists, as in a run
                trainer.agent.update(buffer.sample(a.batch_size, a.n_step, a.gamma), trainer.step)
            trainer.step = len(buffer)
            # untimed: the first copies in a process also pay for fresh memory pages (up to ~1 s on a 2-core VM)
            trainer.save_checkpoint()
            trainer.ckpt.wait()
            stall, write, size = [], [], []
            for _ in range(cfg.checkpoint_reps):
                start = time.perf_counter()
                path = trainer.save_checkpoint()
                stall.append(time.perf_counter() - start)
                trainer.ckpt.wait()
                write.append(time.perf_counter() - start)
                size.append(path.stat().st_size / 1e6)
        finally:
            trainer.close_envs()
    what = (f"{describe_default(conf)}, agent.buffer_size={a.buffer_size} full ({len(buffer)} "
            f"transitions, {cfg.checkpoint_env_steps} rendered env steps cycled), "
            f"trainer.checkpoint_buffer={str(conf.trainer.checkpoint_buffer).lower()}")
    result.rows.append(Row("checkpoint/default_stall", "s", stall,
                           f"Trainer.save_checkpoint() until it returns, what the loop waits for: copies of the "
                           f"agent's tensors and the buffer's filled rows; {what}"))
    result.rows.append(Row("checkpoint/default_write", "s", write,
                           "from the same call until the file is complete: the copies, then zlib compression of the "
                           "buffer and torch.save + fsync in the background thread"))
    result.rows.append(Row("checkpoint/default_size", "MB", size, "the checkpoint file"))
    say(f"checkpoint at the default configuration: the loop waits {statistics.median(stall):.2f} s, the file "
        f"({statistics.median(size):.0f} MB) is complete after {statistics.median(write):.2f} s")
