"""Checkpoints scale with what was collected: only the buffer's filled rows, compressed, read back exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from av_td3.agent.td3 import TD3, Spec
from av_td3.checkpoint import CheckpointManager, load
from av_td3.config import AgentConfig, MonitorConfig
from av_td3.envs.base import ACTION_NAMES
from av_td3.replay import ReplayBuffer

STATE_DIM = 15  # the default state vector (lane points, speed, lead vehicle)
_GRID = np.mgrid[0:64, 0:64]


def road_frame(t: int) -> np.ndarray:
    """A smooth synthetic 64x64 camera frame uint8 [64, 64]: a sky-to-road gradient, lane marks that scroll with
    the step ``t`` and a car that drifts across, like the embedded simulator's rendered frames (which compress
    ~17x with zlib level 1; measured in docs/troubleshooting.md)."""
    y, x = _GRID
    img = 60 + 2 * y + (x // 8)
    img = np.where((np.abs(x - 32 - (y - 32) // 4) < 2) & (((y + 3 * t) // 6) % 2 == 0), 230, img)
    cx = 10 + (t // 3) % 40
    img[40:48, cx:cx + 6] = 20
    return img.astype(np.uint8)


def fill(buf: ReplayBuffer, steps: int, seed: int = 0, episode_len: int = 250) -> None:
    """``steps`` vectorised steps of smooth 64x64 frames into ``buf`` (episodes of ``episode_len`` steps), as
    the trainer stores them."""
    rng = np.random.default_rng(seed)
    n = buf.num_envs

    def obs(t: int) -> dict[str, np.ndarray]:
        return {"image": np.broadcast_to(road_frame(t), (n, buf.stack, 64, 64)),
                "state": rng.normal(size=(n, STATE_DIM)).astype(np.float32)}

    buf.start_episode(obs(0))
    for t in range(1, steps + 1):
        # streams end their episodes at different steps, so they hold different numbers of rows
        ended = (t + np.arange(n) * 7) % episode_len == 0
        buf.add(rng.uniform(-1, 1, (n, 2)).astype(np.float32), rng.normal(size=n).astype(np.float32), obs(t),
                ended, np.zeros(n, dtype=bool))
        if ended.any():
            o = obs(t)
            buf.start_episode({k: v[ended] for k, v in o.items()}, np.flatnonzero(ended))


def assert_same_buffer(a: ReplayBuffer, b: ReplayBuffer) -> None:
    # The slots past the longest stream were never written (and comparing them would commit the lazily
    # allocated pages of both buffers, ~0.8 GB at the default size); has_action is checked whole, as len() reads it.
    filled = int(a._size.max())
    for name in a._rows:
        np.testing.assert_array_equal(a._rows[name][:, :filled], b._rows[name][:, :filled], err_msg=name)
    np.testing.assert_array_equal(a._rows["has_action"], b._rows["has_action"])
    np.testing.assert_array_equal(a._ptr, b._ptr)
    np.testing.assert_array_equal(a._size, b._size)
    np.testing.assert_array_equal(a._needs_start, b._needs_start)
    assert len(a) == len(b)
    if len(a) == 0:
        return
    x, y = a.sample(64, n_step=3, gamma=0.9), b.sample(64, n_step=3, gamma=0.9)  # same rng state: same draws
    for field, u, v in zip(x._fields, x, y):
        torch.testing.assert_close(u, v, msg=field)


def test_checkpoint_at_3k_steps_is_under_50_mb_at_default_sizes(tmp_path: Path) -> None:
    """64x64 frames stacked 4 deep, agent.buffer_size=100000, the default networks: the whole allocated buffer
    (~425 MB) used to be written; now only the 3,000 collected rows, compressed."""
    buf = ReplayBuffer(100_000, (64, 64), 4, STATE_DIM, 2)
    fill(buf, 3_000)
    spec = Spec(stack=4, height=64, width=64, state_dim=STATE_DIM, action_dim=2,
                state_scale=np.ones(STATE_DIM, np.float32), action_names=ACTION_NAMES)
    agent = TD3(AgentConfig(), MonitorConfig(), spec, torch.device("cpu"), q_bound=1e3, seed=0)
    state = {"step": 3_000, "episodes": 12, "agent": agent.state_dict(), "buffer": buf.state_dict(),
             "rng": {"trainer": np.random.default_rng(1).bit_generator.state, "python": random.getstate(),
                     "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    path = CheckpointManager(tmp_path, keep=2).save(state, 3_000)

    size = path.stat().st_size
    assert size < 50e6, f"checkpoint at step 3000 is {size / 1e6:.1f} MB"
    assert size < buf.nbytes / 10  # not the allocation: a tenth of it would already be 43 MB

    restored = ReplayBuffer(100_000, (64, 64), 4, STATE_DIM, 2)
    restored.load_state_dict(load(path)["buffer"])
    assert_same_buffer(buf, restored)


@pytest.mark.parametrize("steps", [0, 5, 40, 130])  # empty, partly filled, just wrapped, wrapped several times
def test_buffer_round_trip_through_a_checkpoint_is_exact(tmp_path: Path, steps: int) -> None:
    buf = ReplayBuffer(90, (64, 64), 4, STATE_DIM, 2, num_envs=3, seed=5)
    fill(buf, steps, episode_len=9)
    path = CheckpointManager(tmp_path, keep=1).save({"buffer": buf.state_dict()}, steps)
    restored = ReplayBuffer(90, (64, 64), 4, STATE_DIM, 2, num_envs=3, seed=99)
    restored.load_state_dict(load(path)["buffer"])
    assert_same_buffer(buf, restored)


def test_large_fields_are_packed_in_bounded_chunks(monkeypatch) -> None:
    """Fields larger than a chunk are cut into several compressed chunks (bounded memory while packing and
    unpacking) and still read back exactly."""
    monkeypatch.setattr("av_td3.replay._CHECKPOINT_CHUNK_BYTES", 3 * 64 * 64)
    buf = ReplayBuffer(200, (64, 64), 2, STATE_DIM, 2, num_envs=2)
    fill(buf, 50, episode_len=11)
    d = buf.state_dict()
    assert d["filled"] > 50
    assert len(d["rows"]["frame"]["chunks"]) == 2 * -(-d["filled"] // 3)  # per stream: ceil(rows / 3 per chunk)
    restored = ReplayBuffer(200, (64, 64), 2, STATE_DIM, 2, num_envs=2)
    restored.load_state_dict(d)
    assert_same_buffer(buf, restored)


def test_a_corrupt_or_mismatched_buffer_checkpoint_is_refused_naming_the_field() -> None:
    buf = ReplayBuffer(100, (64, 64), 4, STATE_DIM, 2)
    fill(buf, 30)
    d = buf.state_dict()
    chunk = d["rows"]["frame"]["chunks"][0]
    chunk[len(chunk) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="'frame' is corrupt"):
        ReplayBuffer(100, (64, 64), 4, STATE_DIM, 2).load_state_dict(d)
    with pytest.raises(ValueError, match="agent.buffer_size"):
        ReplayBuffer(200, (64, 64), 4, STATE_DIM, 2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="'frame'.*image/state shape"):
        ReplayBuffer(100, (32, 32), 4, STATE_DIM, 2).load_state_dict(buf.state_dict())
