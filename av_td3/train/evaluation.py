"""Evaluation: the deterministic policy on fixed-seed episodes, comparable across runs and configurations."""

from __future__ import annotations

import numpy as np

from av_td3.agent.base import Agent
from av_td3.envs.base import DrivingEnv
from av_td3.loggers.base import FanOut

FRAMES_KEPT = 16  # of the first evaluation episode, for the eval/observation images (every 4th is logged)


def evaluate(env: DrivingEnv, agent: Agent, episodes: int, eval_seed: int, step: int,
             logger: FanOut) -> dict[str, float]:
    """Run ``episodes`` episodes with seeds ``eval_seed + i`` and no exploration noise; return the ``eval/*``
    means (return, success rate, collisions and lane invasions per episode). A success is an episode that
    reached its step limit without crashing or leaving the road."""
    returns, successes, collisions, invasions = [], [], [], []
    frames = []
    for i in range(episodes):
        obs, _ = env.reset(seed=eval_seed + i)
        policy = agent.for_evaluation()
        ret, n_col, n_inv, done = 0.0, 0, 0, False
        while not done:
            batch = {k: v[None] for k, v in obs.items()}
            action = policy.check_action(policy.act(batch, noise=0.0)[0], step)
            obs, r, term, trunc, info = env.step(action)
            ret += r
            n_col += int(info["collision"])
            n_inv += int(info["lane_invasion"])
            if i == 0 and len(frames) < FRAMES_KEPT:
                frames.append(obs["image"][-1])
            done = term or trunc
        returns.append(ret)
        successes.append(float(trunc and not term))
        collisions.append(n_col)
        invasions.append(n_inv)
    if frames:
        logger.log_images("eval/observation", np.stack(frames[:: max(1, len(frames) // 4)]), step)
    return {"eval/return": float(np.mean(returns)), "eval/success_rate": float(np.mean(successes)),
            "eval/collisions": float(np.mean(collisions)), "eval/lane_invasions": float(np.mean(invasions))}
