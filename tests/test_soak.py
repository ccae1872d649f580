"""Long-run health: memory flat once the replay buffer is full, no leaking file handles, logs grow linearly.

CI runs a bounded form; set AV_TD3_SOAK_STEPS (e.g. 50000) for a long soak on your machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from av_td3.train import Trainer
from tests.test_config import load

STEPS = int(os.environ.get("AV_TD3_SOAK_STEPS", "1600"))
LOG_EVERY = 100
BUFFER = 300


@pytest.mark.slow
def test_many_short_episodes_do_not_degrade(tmp_path: Path, monkeypatch) -> None:
    cfg = load("debug=smoke", f"trainer.total_steps={STEPS}", "trainer.learning_starts=100",
               f"trainer.log_every={LOG_EVERY}", f"trainer.eval_every={STEPS // 4}", "trainer.eval_episodes=1",
               f"trainer.checkpoint_every={STEPS // 4}", "env.max_episode_steps=12", f"agent.buffer_size={BUFFER}",
               "agent.batch_size=8", "env.image.height=24", "env.image.width=24", "trainer.resume=none")
    me = psutil.Process()
    samples: list[tuple[int, int, int, int]] = []  # step, rss, open files, csv bytes
    original = Trainer._report

    def sample(self, bar, scalars):
        original(self, bar, scalars)
        csv_bytes = (tmp_path / "run" / "scalars.csv").stat().st_size
        samples.append((self.step, me.memory_info().rss, me.num_fds(), csv_bytes))

    monkeypatch.setattr(Trainer, "_report", sample)
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.train()
    assert summary.status == "completed" and summary.steps == STEPS
    assert trainer.episodes >= STEPS // 12

    # after the buffer has filled (and a couple of intervals to warm allocator caches), RSS stays flat
    steady = [s for s in samples if s[0] >= BUFFER + 4 * LOG_EVERY]
    assert len(steady) >= 5
    rss = [s[1] for s in steady]
    assert max(rss) - min(rss) < 40 * 2**20, f"RSS grew by {(max(rss) - min(rss)) / 2**20:.1f} MiB"
    # the trend: the second half of the steady samples is not above the first half beyond noise
    half = len(rss) // 2
    assert sum(rss[half:]) / len(rss[half:]) - sum(rss[:half]) / half < 20 * 2**20
    fds = [s[2] for s in steady]
    # A leak raises the floor as the run goes on. A file open for a moment is not one: TensorBoard's writer
    # thread opens its event file for each flush, so any one sample may count it, the last one included.
    assert min(fds[half:]) <= min(fds[:half]) and max(fds) - min(fds) <= 2, f"open file handles grew: {fds}"
    # CSV grows by about the same number of bytes per logging interval (no re-writes, no duplicates)
    growth = [b[3] - a[3] for a, b in zip(steady, steady[1:])]
    assert max(growth) < 3 * (sum(growth) / len(growth)) and min(growth) > 0
