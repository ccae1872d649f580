"""Per-episode statistics of the training envs: one :class:`Episode` record per env, logged when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from av_td3.envs.base import REWARD_COMPONENTS


@dataclass
class Episode:
    """Totals of one env's episode so far (``length`` in env steps, the rest summed per step)."""
    ret: float = 0.0
    length: int = 0
    collisions: float = 0.0
    lane_invasions: float = 0.0
    reward: dict[str, float] = field(default_factory=dict)  # reward component -> its sum

    def scalars(self) -> dict[str, float]:
        """The ``episode/*`` tags."""
        return {"episode/return": self.ret, "episode/length": self.length, "episode/collisions": self.collisions,
                "episode/lane_invasions": self.lane_invasions,
                **{f"episode/reward_{c}": v for c, v in self.reward.items()}}


class Episodes:
    """The episodes in progress in ``n`` envs; ``components``: the keys of ``info["reward_components"]``."""

    def __init__(self, n: int, components: tuple[str, ...] = REWARD_COMPONENTS) -> None:
        self.components = components
        self.running = [self._new() for _ in range(n)]
        self.last_return = float("nan")  # of the newest finished episode, for progress reports

    def _new(self) -> Episode:
        return Episode(reward=dict.fromkeys(self.components, 0.0))

    def add(self, reward: np.ndarray, info: dict) -> None:
        """One env step: ``reward`` [n] and the vector env's ``info`` (collision, lane_invasion,
        reward_components, and interrupted when the backend reports it: [n] each). An interrupted step never
        happened (a lost simulator): it is not counted."""
        components = info["reward_components"]
        interrupted = info.get("interrupted")
        for i, ep in enumerate(self.running):
            if interrupted is not None and interrupted[i]:
                continue
            ep.ret += float(reward[i])
            ep.length += 1
            ep.collisions += float(info["collision"][i])
            ep.lane_invasions += float(info["lane_invasion"][i])
            for c in self.components:
                ep.reward[c] += float(components[c][i])

    def finish(self, i: int) -> Episode:
        """Env ``i``'s episode ended: its record, and a fresh one in its place."""
        done, self.running[i] = self.running[i], self._new()
        self.last_return = done.ret
        return done

    def abandon(self, i: int) -> None:
        """Env ``i``'s episode was cut by a lost simulator: dropped unlogged (its return is not the policy's), and
        a fresh one in its place."""
        self.running[i] = self._new()

    def discard(self) -> None:
        """Every episode in progress is abandoned unlogged (an evaluation took over the training env)."""
        self.running = [self._new() for _ in self.running]
