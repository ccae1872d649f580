"""Each public config key changes behaviour, not just the printed config.

Trainer keys are shown on tiny in-process runs; agent keys on the composed config's TD3 updates; env keys in
tests/test_env_highway.py (and tests/test_env_carla.py for the CARLA backend's env.carla.* keys and the reward's
rule penalties); monitor keys in
tests/test_monitor.py; logger keys in tests/test_loggers.py.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from av_td3.config import Config, ConfigError
from av_td3.train import Trainer, resolve_device
from tests.test_config import load
from tests.test_td3 import make_batch, params

TINY = ("debug=smoke", "trainer.total_steps=60", "trainer.learning_starts=30", "trainer.eval_every=1000",
        "trainer.checkpoint_every=1000", "trainer.log_every=1000", "agent.batch_size=8", "env.image.height=24",
        "env.image.width=24", "env.max_episode_steps=25", "trainer.resume=none")


def train(tmp_path: Path, *overrides: str) -> tuple[Trainer, dict[str, list[tuple[int, float]]]]:
    cfg = load(*TINY, *overrides)
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir)
    trainer.train()
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "scalars.csv") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return trainer, series


def test_seed_changes_the_run(tmp_path: Path) -> None:
    a, sa = train(tmp_path / "a", "seed=1")
    b, sb = train(tmp_path / "b", "seed=2")
    c, sc = train(tmp_path / "c", "seed=1")
    assert sa["episode/return"] == sc["episode/return"], "same seed, same run"
    assert sa["episode/return"] != sb["episode/return"]
    assert not all(torch.equal(x, y) for x, y in zip(params(a.agent.actor), params(b.agent.actor)))


def test_total_steps_and_learning_starts(tmp_path: Path) -> None:
    t, _ = train(tmp_path / "a", "trainer.total_steps=50", "trainer.learning_starts=20")
    assert t.step == 50 and t.agent.critic_updates == 30
    t, _ = train(tmp_path / "b", "trainer.total_steps=50", "trainer.learning_starts=40")
    assert t.agent.critic_updates == 10


def test_eval_every_eval_episodes_log_every(tmp_path: Path, monkeypatch) -> None:
    resets = Counter()
    original = Trainer.evaluate

    def counting(self):
        resets["evals"] += 1
        reset = self.eval_env.reset

        def spy(*a, **k):
            resets["episodes"] += 1
            return reset(*a, **k)

        self.eval_env.reset = spy
        try:
            return original(self)
        finally:
            self.eval_env.reset = reset

    monkeypatch.setattr(Trainer, "evaluate", counting)
    _, s = train(tmp_path / "a", "trainer.eval_every=20", "trainer.eval_episodes=2", "trainer.log_every=10")
    assert [step for step, _ in s["eval/return"]] == [20, 40, 60]
    assert resets["evals"] == 3 and resets["episodes"] == 6
    assert [step for step, _ in s["perf/steps_per_s"]] == [10, 20, 30, 40, 50, 60]
    assert [step for step, _ in s["grad/critic/updates"]] == [40, 50, 60]


def test_eval_episodes_changes_the_measurement_not_the_training(tmp_path: Path) -> None:
    """Why compare pools runs evaluated on different numbers of episodes (rundir.NOT_EXPERIMENT_KEYS): the same
    seed trains the same episodes and weights whether each evaluation plays 1 episode or 3."""
    a, sa = train(tmp_path / "a", "trainer.eval_every=30", "trainer.eval_episodes=1")
    b, sb = train(tmp_path / "b", "trainer.eval_every=30", "trainer.eval_episodes=3")
    assert sa["episode/return"] == sb["episode/return"]
    assert all(torch.equal(x, y) for x, y in zip(params(a.agent.critic), params(b.agent.critic)))
    assert sa["eval/return"] != sb["eval/return"]  # measured on other episodes


def test_checkpoint_every(tmp_path: Path, monkeypatch) -> None:
    saved: list[int] = []
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: saved.append(self.step))
    train(tmp_path / "a", "trainer.checkpoint_every=1000")
    assert saved == [60], "only the final checkpoint"
    saved.clear()
    train(tmp_path / "b", "trainer.checkpoint_every=20")
    # a single env checkpoints at the first episode end at or after each multiple (episodes <= 25 steps), and at the end
    assert len(saved) >= 2 and 20 <= saved[0] <= 45 and saved[-1] == 60


def test_device(tmp_path: Path) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device=cuda"):
            resolve_device("cuda")


def _after_updates(overrides: tuple[str, ...], n: int = 2) -> list[torch.Tensor]:
    """Every parameter of a small composed-config TD3 (online and target) after ``n`` updates on fixed batches,
    their rewards ever larger (so the gradient norms grow and the statistics-driven clips bite)."""
    from av_td3.agent.td3 import TD3
    from tests.test_td3 import SPEC

    cfg: Config = load(*overrides, "agent.features_dim=16", "agent.hidden_dim=32")
    agent = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
    for i in range(n):
        agent.update(make_batch(i, reward_scale=50.0 * (i + 1)), step=i)
    return params(agent.actor) + params(agent.critic) + params(agent.critic_target)


@pytest.mark.parametrize("key, a, b", [
    ("agent.lr.actor", 1e-4, 1e-2), ("agent.lr.critic", 1e-4, 1e-2), ("agent.tau", 0.001, 0.5),
    ("agent.gamma", 0.5, 0.99), ("agent.policy_noise", 0.0, 0.5), ("agent.noise_clip", 0.0, 0.5),
    ("agent.clip.actor", "null", 1e-4), ("agent.clip.critic", "null", 1e-4), ("agent.policy_freq", 1, 2),
    ("agent.precision", "fp32", "bf16"), ("agent.optimizer", "adam", "sgd"), ("agent.clip.mode", "norm", "agc"),
])
def test_agent_keys_change_the_update(key: str, a, b) -> None:
    results = [_after_updates((f"{key}={value}",)) for value in (a, b)]
    assert not all(torch.equal(x, y) for x, y in zip(*results))


@pytest.mark.parametrize("key, a, b, context", [
    ("agent.momentum", 0.0, 0.9, ("agent.optimizer=sgd",)),
    ("agent.clip.agc", 1e-3, 0.3, ("agent.clip.mode=agc",)),
    # z = 0.1: the growing norms after the 2-norm warm-up are clipped, to mean + 0.1 std or mean + 0.01/z-score std
    ("agent.clip.zscore_scaling", "adaptive", "threshold", ("agent.clip.mode=zscore", "agent.clip.warmup=2",
                                                            "agent.clip.z=0.1")),
])
def test_keys_of_one_mode_change_the_update_in_that_mode(key: str, a, b, context: tuple[str, ...]) -> None:
    """Keys read only under another key's value (agent.momentum with agent.optimizer=sgd, ...), shown there."""
    results = [_after_updates((*context, f"{key}={value}"), n=6) for value in (a, b)]
    assert not all(torch.equal(x, y) for x, y in zip(*results))


def test_exploration_noise_batch_size_buffer_size(tmp_path: Path, monkeypatch) -> None:
    cfg = load(*TINY, "agent.exploration_noise=0.0")
    t = Trainer(cfg, tmp_path / "a")
    obs, _ = t.eval_env.reset(seed=0)
    batch = {k: v[None] for k, v in obs.items()}
    quiet = t.agent.act(batch, noise=cfg.agent.exploration_noise)
    assert np.array_equal(quiet, t.agent.act(batch, noise=0.0))
    assert not np.array_equal(quiet, t.agent.act(batch, noise=0.3))

    sizes = []
    cfg = load(*TINY, "agent.batch_size=12", "agent.buffer_size=500")
    t = Trainer(cfg, tmp_path / "b")
    original = t.buffer.sample
    t.buffer.sample = lambda n, *args: sizes.append(n) or original(n, *args)
    t.train()
    assert set(sizes) == {12}
    assert t.buffer.nbytes < Trainer(load(*TINY, "agent.buffer_size=900"), tmp_path / "c").buffer.nbytes


def test_n_step_reaches_the_sampled_batches(tmp_path: Path) -> None:
    discounts: dict[int, set] = {}
    for n in (1, 3):
        cfg = load(*TINY, f"agent.n_step={n}", "agent.gamma=0.5")
        t = Trainer(cfg, tmp_path / f"n{n}")
        update = t.agent.update
        seen = discounts.setdefault(n, set())

        def spy(batch, step, update=update, seen=seen):
            seen.update([None] if batch.discount is None else batch.discount.tolist())
            return update(batch, step)

        t.agent.update = spy
        t.train()
    assert discounts[1] == {None}  # one step: the agent's gamma
    assert discounts[3] <= {0.5, 0.25, 0.125} and 0.125 in discounts[3]  # up to 3 rewards summed


@pytest.mark.parametrize("overrides", [("agent.augment=none",), ("agent.augment_pad=1",)])
def test_augment_keys_change_the_update(overrides: tuple[str, ...]) -> None:
    """agent.augment=none against the default shift, and agent.augment_pad=1 against its default 4."""
    from av_td3.agent.td3 import TD3
    from tests.test_td3 import SPEC

    results = []
    for chosen in ((), overrides):
        cfg: Config = load(*chosen, "agent.features_dim=16", "agent.hidden_dim=32")
        agent = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
        for i in range(2):
            agent.update(make_batch(i, reward_scale=50.0), step=i)
        results.append(params(agent.critic))
    assert not all(torch.equal(x, y) for x, y in zip(*results))


def test_view_keys_change_the_frames() -> None:
    """env.view and each env.bev.* key change what the composed config's env shows (see tests/test_views.py)."""
    from av_td3.envs import make

    frames = {}
    for overrides in ((), ("env.view=world",), ("env.bev.ahead_m=30",), ("env.bev.behind_m=30",),
                      ("env.bev.side_m=30",)):
        env = make(load(*overrides, "env.npcs=0").env, seed=0)
        frames[overrides] = env.reset(seed=0)[0]["image"]
        env.close()
    images = list(frames.values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
