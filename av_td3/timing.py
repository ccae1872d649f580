"""Where one training step's time goes: a lap timer the trainer and the agent call between their phases.

The trainer and :class:`av_td3.agent.td3.TD3` hold :data:`NO_PHASES` (every call a no-op) unless ``av-td3 bench``
hands them a :class:`PhaseTimer` (``Trainer.time_phases``). Each ``lap(name)`` adds the wall time since the
previous lap to ``name``, so consecutive laps cover a step without gaps and the phases add up to the step's time.
"""

from __future__ import annotations

import time

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
