"""Progress of a run for the person watching it: a bar on a terminal, a line every ``line_every_s`` seconds
otherwise (a log file, a cluster job), both with an ETA.

The time left comes from the learning phase's own rate. The warm-up (``trainer.learning_starts`` steps of random
actions, no updates) runs many times faster per step than learning, so an estimate taken from it would promise
minutes for what takes an hour; during the warm-up the label says "warm-up" instead. The rate shown is the
current phase's recent rate (since the previous line, or the last few seconds on a terminal), never a figure
left over from the other phase.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

log = logging.getLogger("av_td3.train")

LINE_EVERY_S = 30.0   # without a terminal: one progress line per this many seconds
POSTFIX_EVERY_S = 1.0  # on a terminal: the ETA and rates refresh at most this often (the bar itself every step)


def eta_s(step: int, total: int, phase_step: int | None, phase_time: float | None, now: float) -> float | None:
    """Seconds left at the learning phase's rate: (total - step) / ((step - phase_step) / (now - phase_time)),
    where (phase_step, phase_time) is where the learning phase began. None before it began, and in its first
    second (too few steps for a rate)."""
    if phase_step is None or phase_time is None or step <= phase_step or now - phase_time < 1.0:
        return None
    rate = (step - phase_step) / (now - phase_time)
    return max(total - step, 0) / rate


def format_duration(seconds: float) -> str:
    """A duration as a person says it: "1 h 10 min", "12 min 5 s", "45 s" (never a clock time)."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


class Progress:
    """Call :meth:`update` after every env step and :meth:`set_stats` at each log interval."""

    def __init__(self, total: int, initial: int, learning_starts: int, bar: bool,
                 clock: Callable[[], float] = time.perf_counter, line_every_s: float = LINE_EVERY_S) -> None:
        self.total, self.step, self.learning_starts = total, initial, learning_starts
        self.clock = clock
        self.line_every_s = line_every_s
        self.phase_step: int | None = None   # where the learning phase began (in this process)
        self.phase_time: float | None = None
        self.stats = ""
        self._last_postfix = self._last_line = clock()
        self._rate_from = (self._last_line, initial)  # (time, step) the shown rate is measured from
        self.rate: float | None = None  # the current phase's recent env steps/s
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, step: int, warmup: bool) -> None:
        """``warmup``: this step took a random action (no updates yet)."""
        now = self.clock()
        if not warmup and self.phase_step is None:
            self.phase_step, self.phase_time = step, now
            self._rate_from, self.rate = (now, step), None  # the warm-up's rate says nothing about learning
        delta, self.step = step - self.step, step
        if self._bar is not None:
            if now - self._last_postfix >= POSTFIX_EVERY_S or step >= self.total:
                self._measure_rate(now)
                self._bar.set_postfix_str(self.describe(now), refresh=False)
                self._last_postfix = now
            self._bar.update(delta)
        elif now - self._last_line >= self.line_every_s:
            self._measure_rate(now)
            log.info("step %d/%d (%.0f%%) | %s", step, self.total, 100 * step / self.total, self.describe(now))
            self._last_line = now

    def _measure_rate(self, now: float) -> None:
        """The rate since the previous measurement (at least a second ago), within the current phase."""
        then, from_step = self._rate_from
        if now - then >= 1.0 and self.step > from_step:
            self.rate = (self.step - from_step) / (now - then)
            self._rate_from = (now, self.step)

    def set_stats(self, stats: str) -> None:
        """The latest figures worth showing next to the time left (last episode return, alerts)."""
        self.stats = stats

    def describe(self, now: float) -> str:
        """"learning, 1 h 2 min left | 11.8 steps/s" in the learning phase, "warm-up ..." before it (random
        actions until learning_starts), then the stats."""
        eta = eta_s(self.step, self.total, self.phase_step, self.phase_time, now)
        rate = "" if self.rate is None else f" | {self.rate:.1f} steps/s"
        if eta is not None:
            head = f"learning, {format_duration(eta)} left{rate}"
        elif self.phase_step is None:
            head = f"warm-up ({self.step}/{self.learning_starts} random steps, no estimate yet){rate}"
        else:
            head = "learning, time left after a second of it"
        return f"{head} | {self.stats}" if self.stats else head

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
