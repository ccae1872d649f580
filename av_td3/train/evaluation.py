"""Evaluation: the deterministic policy on fixed-seed episodes, comparable across runs and configurations."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from av_td3.agent.base import Agent
from av_td3.envs.base import SimulatorLostError
from av_td3.loggers.base import FanOut

log = logging.getLogger("av_td3.train")

FRAMES_KEPT = 16  # of the first evaluation episode, for the eval/observation images (every 4th is logged)
# An episode cut by a lost simulator (CARLA, info["interrupted"]) is run again from its seed this many times at
# most; then it is left out of the means. Its partial return would otherwise count as a success.
EVAL_RERUNS = 2


@dataclass
class _Episode:
    ret: float = 0.0
    collisions: int = 0
    invasions: int = 0
    success: bool = False
    interrupted: bool = False
    frames: list[np.ndarray] = field(default_factory=list)


def _run_episode(env: gym.Env, agent: Agent, seed: int, step: int, keep_frames: bool) -> _Episode:
    obs, _ = env.reset(seed=seed)
    policy = agent.for_evaluation()
    ep, done = _Episode(), False
    while not done:
        batch = {k: v[None] for k, v in obs.items()}
        action = policy.check_action(policy.act(batch, noise=0.0)[0], step)
        obs, r, term, trunc, info = env.step(action)
        if info.get("interrupted", False):
            ep.interrupted = True
            return ep
        ep.ret += float(r)  # a float already (the contract); gymnasium types it SupportsFloat
        ep.collisions += int(info["collision"])
        ep.invasions += int(info["lane_invasion"])
        if keep_frames and len(ep.frames) < FRAMES_KEPT:
            ep.frames.append(obs["image"][-1])
        done = term or trunc
    ep.success = bool(trunc and not term)
    return ep


def evaluate(env: gym.Env, agent: Agent, episodes: int, eval_seed: int, step: int,
             logger: FanOut) -> dict[str, float]:
    """Run ``episodes`` episodes with seeds ``eval_seed + i`` and no exploration noise; return the ``eval/*``
    means (return, success rate, collisions and lane invasions per episode). A success is an episode that
    reached its step limit without crashing or leaving the road. An episode the simulator was lost in is run again
    from its seed (up to ``EVAL_RERUNS`` times), else left out with a warning; SimulatorLostError when none is
    left."""
    done: list[_Episode] = []
    for i in range(episodes):
        for attempt in range(EVAL_RERUNS + 1):
            ep = _run_episode(env, agent, eval_seed + i, step, keep_frames=i == 0)
            if not ep.interrupted:
                done.append(ep)
                break
            log.warning("evaluation episode %d (seed %d) was cut by a lost simulator: %s.", i, eval_seed + i,
                        "running it again" if attempt < EVAL_RERUNS else "left out of the evaluation's means")
    if not done:
        raise SimulatorLostError(f"every one of the {episodes} evaluation episodes was cut by a lost simulator, "
                                 f"{EVAL_RERUNS + 1} times each: the evaluation at step {step} has no result")
    frames = done[0].frames  # the first episode's, when it was not left out
    if frames:
        logger.log_images("eval/observation", np.stack(frames[:: max(1, len(frames) // 4)]), step)
    return {"eval/return": float(np.mean([e.ret for e in done])),
            "eval/success_rate": float(np.mean([e.success for e in done])),
            "eval/collisions": float(np.mean([e.collisions for e in done])),
            "eval/lane_invasions": float(np.mean([e.invasions for e in done]))}
