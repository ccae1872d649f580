"""Per-episode statistics of the training loop (av_td3/train/episodes.py): one record per env, logged once."""

from __future__ import annotations

import numpy as np

from av_td3.envs.base import REWARD_COMPONENTS
from av_td3.train.episodes import Episodes


def info(collision: list[bool], invasion: list[bool], component: float) -> dict:
    n = len(collision)
    return {"collision": np.array(collision), "lane_invasion": np.array(invasion),
            "reward_components": {c: np.full(n, component) for c in REWARD_COMPONENTS}}


def test_each_env_sums_its_own_episode_and_a_finished_one_starts_afresh() -> None:
    eps = Episodes(2)
    eps.add(np.array([1.0, 2.0]), info([False, True], [True, False], 0.5))
    eps.add(np.array([1.5, -1.0]), info([False, True], [False, False], 0.25))
    done = eps.finish(1)
    assert done.scalars() == {"episode/return": 1.0, "episode/length": 2, "episode/collisions": 2.0,
                              "episode/lane_invasions": 0.0,
                              **{f"episode/reward_{c}": 0.75 for c in REWARD_COMPONENTS}}
    assert eps.last_return == 1.0
    assert eps.running[1].length == 0 and eps.running[1].reward == dict.fromkeys(REWARD_COMPONENTS, 0.0)
    assert eps.running[0].ret == 2.5 and eps.running[0].lane_invasions == 1.0


def test_discarded_episodes_are_not_logged_and_restart_from_zero() -> None:
    eps = Episodes(1)
    eps.add(np.array([3.0]), info([False], [False], 1.0))
    eps.discard()
    assert eps.running[0].ret == 0.0 and eps.running[0].length == 0 and np.isnan(eps.last_return)


def test_an_interrupted_step_is_not_counted_and_its_episode_is_abandoned() -> None:
    """#35: a step the simulator was lost in adds nothing; its episode is dropped unlogged, not finished."""
    eps = Episodes(2)
    eps.add(np.array([1.0, 2.0]), info([False, False], [False, False], 0.5))
    cut = {**info([True, True], [False, False], 9.0), "interrupted": np.array([False, True])}
    eps.add(np.array([1.0, 100.0]), cut)
    assert eps.running[1].length == 1 and eps.running[1].ret == 2.0 and eps.running[1].collisions == 0.0
    assert eps.running[0].length == 2 and eps.running[0].collisions == 1.0
    eps.abandon(1)
    assert eps.running[1].length == 0 and np.isnan(eps.last_return)
