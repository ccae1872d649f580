"""The agent protocol: everything the trainer may ask of an agent, and nothing more.

The trainer (:mod:`av_td3.train`) sees an agent only through :class:`Agent`; :class:`~av_td3.agent.td3.TD3` and
:class:`~av_td3.agent.pid.PIDAgent` implement it. How an agent measures itself (TD3's GradMonitor) stays behind
:meth:`Agent.flush` and :meth:`Agent.health`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class Flush:
    """What an agent measured since its previous flush."""
    scalars: dict[str, float]                       # tag -> value, logged at the flush's env step
    fired: list[str] = field(default_factory=list)  # "<net>/<alert>" that fired in this interval


@dataclass
class Health:
    """An agent's numerical record over the whole run (checkpointed with the agent), for summary.json."""
    alerts: dict[str, int] = field(default_factory=dict)  # "<net>/<alert>" -> flushes where it fired
    skipped_updates: int = 0                               # updates dropped as non-finite (monitor.nan_policy=skip)


class Agent(Protocol):
    """An agent the trainer can drive, train, evaluate and checkpoint.

    ``learning`` says what the trainer must provide: a learning agent learns from replayed experience, so the
    trainer keeps a replay buffer for it, acts at random for its first ``trainer.learning_starts`` steps and
    calls :meth:`update` once the buffer holds a batch. An agent that does not learn (``agent=pid``) is only
    asked to act; it runs through the same loop, evaluation, logging and run folder.
    """

    learning: bool

    def act(self, obs: dict[str, np.ndarray], noise: float = 0.0) -> np.ndarray:
        """Observations (image uint8 [n, stack, H, W], state float32 [n, k]) → actions float32 [n, 2] in [-1, 1];
        ``noise``: std of the Gaussian exploration noise (0 for evaluation)."""
        ...

    def update(self, batch: Any, step: int) -> None:
        """One learning step on a replay batch (:class:`av_td3.replay.Batch`) at env step ``step``. Metrics
        accumulate inside the agent until :meth:`flush`."""
        ...

    def flush(self, step: int) -> Flush:
        """The metrics gathered since the previous flush, with the alerts they fire (empty before any update)."""
        ...

    def health(self) -> Health:
        """Alert counts and skipped updates so far."""
        ...

    def reset(self, env_ids: np.ndarray) -> None:
        """New episodes start in the envs ``env_ids`` (int [m]): forget their per-episode state."""
        ...

    def for_evaluation(self) -> Agent:
        """The agent an evaluation episode acts with (one env), leaving the training envs' state alone."""
        ...

    def check_action(self, action: np.ndarray, step: int) -> np.ndarray:
        """Guard: ``action`` [n, 2] if finite; otherwise raise NonFiniteError or return a safe action."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, d: dict) -> None:
        ...
