"""The largest possible per-step reward and the Q-value bound derived from it.

The trainer's monitor (q_divergence alert) and ``av-td3 validate`` must use these same functions, so the alert
and the post-hoc check can never disagree about what "Q within bound" means. """

from __future__ import annotations

from typing import Any

from av_td3.envs import base
from av_td3.envs.backends import backend


def max_abs_reward(cfg: Any) -> float:
    """Upper bound of |r| for one step of ``cfg`` (a :class:`av_td3.config.Config` or the composed DictConfig);
    see :func:`av_td3.envs.base.max_abs_reward` for how each component is bounded."""
    declared = backend(cfg.env)
    return base.max_abs_reward(cfg.env.reward, declared.decision_dt(cfg.env), declared.rules)


def q_bound(cfg: Any) -> float:
    """|Q| (and |actor loss| = |mean Q|) above this means divergence: max|r| / (1 - gamma) * monitor.q_margin.

    max|r| / (1 - gamma) is the largest discounted return any policy can reach; the margin leaves room for the
    normal overestimation early in training.
    """
    return max_abs_reward(cfg) / (1.0 - cfg.agent.gamma) * cfg.monitor.q_margin
