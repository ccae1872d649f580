"""Where one training step's time goes: a lap timer charged at the trainer's hook points and around the agent's
update.

The trainer holds :data:`NO_PHASES` (every call a no-op) at its loop's hook points unless ``av-td3 bench`` hands
it a :class:`PhaseTimer` (``Trainer.time_phases``), which also wraps a learning agent's update in
:class:`UpdatePhases`: the update itself holds no timing calls. Each ``lap(name)`` adds the wall time since the
previous lap to ``name``, so consecutive laps cover a step without gaps and the phases add up to the step's time.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class NoPhases:
    """The timer when nobody measures: every call does nothing."""

    def begin_step(self, step: int) -> None:
        pass

    def lap(self, name: str) -> None:
        pass


NO_PHASES = NoPhases()


class PhaseTimer(NoPhases):
    """Seconds per phase of the training loop, summed over the steps from env step ``start_step`` on.

    ``begin_step(step)`` starts a loop iteration; ``lap(name)`` charges the time since the previous lap (or since
    ``begin_step``) to ``name``. On CUDA each lap first waits for the device (``torch.cuda.synchronize``), so
    kernels are charged to the phase that launched them; on the CPU torch runs synchronously and a lap costs
    one ``perf_counter`` call.
    """

    def __init__(self, device: torch.device, start_step: int = 0) -> None:
        self.device = device
        self.start_step = start_step
        self.seconds: dict[str, float] = {}  # phase -> seconds, in the order phases first ran
        self.steps = 0                      # loop iterations timed
        self._active = False
        self._last = 0.0

    def begin_step(self, step: int) -> None:
        """A loop iteration starts at env step ``step``; it is timed when ``step >= start_step``."""
        self._active = step >= self.start_step
        if self._active:
            self.steps += 1
            self._sync()
            self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if not self._active:
            return
        self._sync()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class UpdatePhases:
    """Charges a TD3 update's time to its phases from outside the update: the update's calls into its
    :class:`~av_td3.agent.monitor.GradMonitor` mark where each phase ends. Installed on ``agent`` (its ``update``
    and its monitor's ``before_clip``, ``after_clip`` and ``observe``), for ``av-td3 bench`` only.

    Per network update: forward and backward up to ``before_clip`` -> the net ("critic", "actor"); the guard,
    the clip and ``after_clip`` -> "monitor" (with the guard's drop of a non-finite update, its time goes to the
    net); the optimizer step, up to the first ``observe`` -> the net; the observations -> "monitor"; after an
    actor update, the rest of the update (the target networks' Polyak step) -> "target".
    """

    def __init__(self, agent: Any, timer: NoPhases) -> None:
        self.timer = timer
        self.net: str | None = None  # the net whose optimizer step runs until the next observe()
        self.actor_stepped = False   # in this update: the actor and the targets were updated
        monitor = agent.monitor
        self._update, self._before, self._after, self._observe = (
            agent.update, monitor.before_clip, monitor.after_clip, monitor.observe)
        agent.update = self.update
        monitor.before_clip, monitor.after_clip, monitor.observe = self.before_clip, self.after_clip, self.observe

    def update(self, batch: Any, step: int) -> None:
        self.net, self.actor_stepped = None, False
        self._update(batch, step)
        if self.actor_stepped:
            self.timer.lap("target")

    def before_clip(self, net: str, loss: torch.Tensor, step: int) -> Any:
        self.timer.lap(net)
        self.net = net
        return self._before(net, loss, step)

    def after_clip(self, net: str, before: Any, clip: Any) -> None:
        self._after(net, before, clip)
        self.timer.lap("monitor")
        self.actor_stepped = net == "actor"

    def observe(self, key: str, value: torch.Tensor) -> None:
        if self.net is not None:
            self.timer.lap(self.net)
            self.net = None
        self._observe(key, value)
        self.timer.lap("monitor")
