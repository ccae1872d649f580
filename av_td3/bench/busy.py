"""``busy/*`` rows: the default run's training speed while two other processes keep the CPU busy, at torch's
default threads next to one thread. It answers "does a run started with the defaults on a shared machine lose
speed to its own threads?" (issue 37: spinning OpenMP threads made such a run ~10x slower than one thread).

Two busy-looping Python processes (:data:`BACKGROUND`) run for the whole section. Today's code trains in child
processes (its own ``launch.py``, as a user starts it, so ``av_td3``'s ``OMP_WAIT_POLICY`` default applies unless
the environment sets one) at the regression rows' sizes and settings
(:func:`av_td3.bench.regression.bench_settings`), ``trainer.torch_threads=0`` (torch's default) and ``=1``
alternating A B B A for ``busy_pairs`` pairs. The ratio ``busy_default_vs_threads1`` is the median over the pairs
of default / one thread; the target is >= 0.9.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from av_td3.bench.config import BenchConfig
from av_td3.bench.regression import Code, code_root, learning_rate
from av_td3.bench.result import BUSY_PREFIX, TODAY, BenchResult, Row, busy_row, paired_ratio
from av_td3.machine import WAIT_POLICY_VAR

BACKGROUND = 2  # busy processes next to the measured run: on a 2-core machine, every core has other work


@contextlib.contextmanager
def background_load(n: int = BACKGROUND) -> Iterator[list[subprocess.Popen]]:
    """``n`` Python processes that loop without end (one core each), stopped on leaving the block (also on an
    error or Ctrl-C)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
             for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def bench_busy(cfg: BenchConfig, out: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    """``busy/threads1`` and ``busy/threads_default``: learning-phase env steps/s of today's default (plus
    ``cfg.overrides``) under :data:`BACKGROUND` busy processes, one value per run, runs in ``out/busy/``."""
    today = Code(TODAY, code_root(), "today's code", cfg.overrides)
    policy = os.environ.get(WAIT_POLICY_VAR, "unset")
    say(f"busy: {cfg.busy_pairs} pairs of {cfg.regression_total_steps}-step runs of today's default at torch's "
        f"default threads and at one thread, next to {BACKGROUND} busy processes ({WAIT_POLICY_VAR}={policy})")
    rates: dict[int, list[float]] = {0: [], 1: []}
    with background_load():
        for k in range(cfg.busy_pairs):
            for threads in (0, 1) if k % 2 == 0 else (1, 0):  # A B B A ...: drifts hit both alike
                run_dir = out.resolve() / "busy" / f"{busy_row(threads).removeprefix(BUSY_PREFIX)}_{k}"
                rates[threads].append(learning_rate(today, cfg, threads, run_dir))
    say(f"busy: torch's default threads {paired_ratio(rates[0], rates[1]):.2f}x one thread's speed "
        "(median over pairs)")
    window = (f"{cfg.regression_total_steps}-step runs learning from {cfg.regression_learning_starts}, env steps/s "
              f"over the log intervals of {cfg.regression_log_every} after that, one value per run, paired with the "
              f"other setting's run next to it; {BACKGROUND} busy-looping processes ran throughout; "
              f"{WAIT_POLICY_VAR}={policy} in the bench's environment")
    for threads, text in ((1, "trainer.torch_threads=1"), (0, "trainer.torch_threads=0 (torch's default)")):
        result.rows.append(Row(busy_row(threads), "env steps/s", rates[threads],
                               f"today's code, default config{' + ' + ' '.join(cfg.overrides) if cfg.overrides else ''}"
                               f", {text}; {window}"))
