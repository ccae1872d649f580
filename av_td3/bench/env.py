"""``env/*`` rows: the embedded simulator's steps per second at the fixed sizes, random actions; with our
vectorised road queries, highway-env's own, and the bird's-eye view, interleaved rep by rep."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from av_td3.bench.config import BenchConfig, fixed_env_config
from av_td3.bench.result import BenchResult, Row


def bench_env(cfg: BenchConfig, result: BenchResult, say: Callable[[str], None]) -> None:
    """Random actions; ``env/steps_per_s`` times the step calls only, ``env/steps_per_s_with_resets`` includes the
    resets (random driving crashes every few steps, far more often than training episodes end).
    ``env/steps_per_s_stock_road`` is the same simulator with highway-env's own per-vehicle road queries instead
    of the vectorised ones (:mod:`av_td3.envs.fast_road`), ``env/steps_per_s_bev`` the default simulator drawing
    the bird's-eye view (``env.view=bev``) instead of the world view; all interleaved rep by rep on the same
    actions."""
    from av_td3.envs.highway import HighwayDrivingEnv

    envs = {"ours": HighwayDrivingEnv(fixed_env_config(cfg), seed=cfg.seed),
            "stock": HighwayDrivingEnv(fixed_env_config(cfg), seed=cfg.seed, vectorised_road=False),
            "bev": HighwayDrivingEnv(fixed_env_config(cfg, view="bev"), seed=cfg.seed)}
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
