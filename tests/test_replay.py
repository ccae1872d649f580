"""Replay buffer: stacks rebuilt from single frames match the env's own frame stack, episode ends and ring-buffer
wraparound never corrupt a transition, and the memory bounds hold.

The streams come from a real :class:`DrivingEnv` (its frame stacking, termination and truncation) over a fake
simulator whose frame pixels and state encode (env, episode, step), so every sampled transition can be compared
exactly with the one the env produced.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from av_td3.config import ConfigError, RewardConfig
from av_td3.envs.base import DrivingEnv, DrivingSignals
from av_td3.replay import Batch, ReplayBuffer, check_memory

STACK, H, W, MAX_STEPS = 4, 2, 3, 6
STATE_DIM, ACTION_DIM = 3, 2  # state = [env, episode, step] (lane_points=0)


class CodedEnv(DrivingEnv):
    """Frames are filled with (env, episode, step) in pixels 0, 1, 2; episodes terminate at random (p=0.25 per
    step) or are truncated at MAX_STEPS."""

    def __init__(self, env_id: int, seed: int) -> None:
        super().__init__(H, W, STACK, 0, MAX_STEPS, RewardConfig(), dt=0.1)
        self.env_id, self.episode, self.steps, self.rng = env_id, -1, 0, np.random.default_rng(seed)

    def _frame(self, crash: bool) -> tuple[np.ndarray, np.ndarray, DrivingSignals]:
        code = (self.env_id, self.episode % 256, self.steps)
        frame = np.zeros((H, W), dtype=np.uint8)
        frame.flat[:3] = code
        # progress grows with the step, so each step of an episode has its own reward
        signals = DrivingSignals(speed=1.0, speed_along_lane=1.0, lateral_offset=0.0, lane_half_width=2.0,
                                 heading_error=0.0, collision=crash, off_road=False, lane_invasion=False,
                                 progress=0.1 + self.steps)
        return frame, np.array(code, dtype=np.float32), signals

    def _sim_reset(self, seed):
        self.episode, self.steps = self.episode + 1, 0
        return self._frame(False)

    def _sim_step(self, action):
        self.steps += 1
        return self._frame(bool(self.rng.random() < 0.25))


def _stacked(obs: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in obs]) for k in ("image", "state")}


def fill(buf: ReplayBuffer, n_envs: int, steps: int, seed: int = 0) -> tuple[dict, list[list]]:
    """Run ``n_envs`` CodedEnvs for ``steps`` vectorised steps into ``buf``, as the trainer does.
    Returns every transition the envs produced, keyed by (env, episode, step) of its observation, and each
    stream's rows in write order as (key, starts_a_transition)."""
    envs = [CodedEnv(i, seed + i) for i in range(n_envs)]
    rng = np.random.default_rng(seed)
    obs = [e.reset()[0] for e in envs]
    buf.start_episode(_stacked(obs))
    rows = [[(_key(o["state"]), False)] for o in obs]
    record = {}
    for _ in range(steps):
        action = rng.uniform(-1, 1, (n_envs, ACTION_DIM)).astype(np.float32)
        results = [e.step(a) for e, a in zip(envs, action)]
        next_obs = [r[0] for r in results]
        reward = np.array([r[1] for r in results], dtype=np.float32)
        terminated = np.array([r[2] for r in results])
        truncated = np.array([r[3] for r in results])
        buf.add(action, reward, _stacked(next_obs), terminated, truncated)
        for i in range(n_envs):
            record[_key(obs[i]["state"])] = dict(obs=obs[i], action=action[i], reward=reward[i],
                                                 next_obs=next_obs[i], terminated=terminated[i],
                                                 truncated=truncated[i])
            rows[i][-1] = (rows[i][-1][0], True)
            rows[i].append((_key(next_obs[i]["state"]), False))
        ended = np.flatnonzero(terminated | truncated)
        if len(ended):
            first = [envs[i].reset()[0] for i in ended]
            buf.start_episode(_stacked(first), env_ids=ended)
            for i, o in zip(ended, first):
                next_obs[i] = o
                rows[i].append((_key(o["state"]), False))
        obs = next_obs
    return record, rows


def _key(state) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(state))


def expected_transitions(rows: list[list], rows_per_env: int) -> set:
    """Independent model of what is sampleable: a transition whose row, stack window (back to the episode start)
    and next row are all among the stream's last ``rows_per_env`` rows."""
    valid = set()
    for stream in rows:
        live = stream[-rows_per_env:]
        for i, (key, starts) in enumerate(live):
            if starts and i >= min(STACK - 1, key[2]) and i + 1 < len(live):
                valid.add(key)
    return valid


def check_batch(batch: Batch, record: dict) -> list[tuple]:
    """Every sampled transition equals the env's, exactly; returns the sampled keys."""
    keys = [_key(s) for s in batch.obs_state.numpy()]
    for b, key in enumerate(keys):
        t = record[key]
        np.testing.assert_array_equal(batch.obs_image[b].numpy(), t["obs"]["image"], err_msg=str(key))
        np.testing.assert_array_equal(batch.next_image[b].numpy(), t["next_obs"]["image"], err_msg=str(key))
        np.testing.assert_array_equal(batch.next_state[b].numpy(), t["next_obs"]["state"])
        np.testing.assert_array_equal(batch.action[b].numpy(), t["action"])
        assert batch.reward[b].item() == t["reward"]
        assert batch.done[b].item() == float(t["terminated"])
    return keys


def make(capacity: int, n_envs: int = 1, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, (H, W), STACK, STATE_DIM, ACTION_DIM, num_envs=n_envs, seed=seed)


def test_batch_types_and_shapes():
    buf = make(100)
    fill(buf, 1, 30)
    b = buf.sample(16)
    assert b.obs_image.dtype == b.next_image.dtype == torch.uint8
    assert b.obs_image.shape == b.next_image.shape == (16, STACK, H, W)
    assert b.obs_state.shape == b.next_state.shape == (16, STATE_DIM)
    assert b.action.shape == (16, ACTION_DIM)
    assert b.reward.shape == b.done.shape == (16,)
    assert all(t.dtype == torch.float32 for t in (b.obs_state, b.next_state, b.action, b.reward, b.done))


def test_stacks_match_env_including_episode_starts_and_ends():
    buf = make(10_000)
    record, rows = fill(buf, 1, 400)
    assert len(buf) == len(expected_transitions(rows, buf.rows_per_env)) == 400
    keys = check_batch(buf.sample(2000), record)
    steps = [k[2] for k in keys]
    assert 0 in steps and 1 in steps and max(steps) >= STACK  # right after starts and past the stack depth


def test_last_transition_leads_to_final_obs_and_done_is_terminated_only():
    buf = make(10_000)
    record, _ = fill(buf, 1, 400)
    batch = buf.sample(4000)
    keys = check_batch(batch, record)  # next_obs is the env's next_obs, which for an ended episode is its final
    assert torch.equal(batch.obs_state[:, 1], batch.next_state[:, 1])  # never the next episode's first obs
    terminated = torch.tensor([bool(record[k]["terminated"]) for k in keys])
    truncated = torch.tensor([bool(record[k]["truncated"]) for k in keys])
    assert terminated.any() and truncated.any()
    assert torch.all(batch.next_state[truncated, 2] == MAX_STEPS)
    assert torch.all(batch.done[terminated] == 1) and torch.all(batch.done[~terminated] == 0)


@pytest.mark.parametrize("n_envs", [1, 3])
def test_wraparound_never_yields_a_corrupted_transition(n_envs):
    buf = make(60, n_envs=n_envs)
    record, rows = fill(buf, n_envs, 500)  # the ring is overwritten many times over
    expected = expected_transitions(rows, buf.rows_per_env)
    assert len(buf) == len(expected)
    keys = []
    for _ in range(20):
        keys += check_batch(buf.sample(256), record)
    assert set(keys) == expected  # only live transitions, and (uniform-ish) every one of them


def n_step_reference(key: tuple, record: dict, n: int, gamma: float) -> tuple[float, dict, bool, int]:
    """Straightforward n-step target pieces for the transition at ``key``, walked one recorded step at a time:
    (discounted reward sum, the observation to bootstrap from, terminated, steps summed)."""
    total, m = 0.0, 0
    while True:
        t = record[key]
        total += gamma ** m * float(t["reward"])
        m += 1
        key = _key(t["next_obs"]["state"])
        if t["terminated"] or t["truncated"] or m == n or key not in record:  # ended, n summed, or newest row
            return total, t["next_obs"], bool(t["terminated"]), m


@pytest.mark.parametrize("n_envs, capacity", [(1, 10_000), (3, 90)])
def test_n_step_sampling_matches_a_per_transition_reference(n_envs: int, capacity: int) -> None:
    n, gamma = 3, 0.5
    buf = make(capacity, n_envs=n_envs)
    record, _ = fill(buf, n_envs, 400)  # with capacity 90 the rings wrap many times
    batch = buf.sample(3000, n_step=n, gamma=gamma)
    steps_seen = set()
    for b, key in enumerate(_key(s) for s in batch.obs_state.numpy()):
        total, nxt, terminated, m = n_step_reference(key, record, n, gamma)
        steps_seen.add(m)
        np.testing.assert_array_equal(batch.obs_image[b].numpy(), record[key]["obs"]["image"], err_msg=str(key))
        np.testing.assert_array_equal(batch.action[b].numpy(), record[key]["action"])
        assert batch.reward[b].item() == pytest.approx(total, rel=1e-6), key
        np.testing.assert_array_equal(batch.next_state[b].numpy(), nxt["state"], err_msg=str(key))
        np.testing.assert_array_equal(batch.next_image[b].numpy(), nxt["image"], err_msg=str(key))
        assert batch.done[b].item() == float(terminated)
        assert batch.discount[b].item() == pytest.approx(gamma ** m)
    assert steps_seen == {1, 2, 3}  # cut short by episode ends, and full length


def test_env_streams_stay_separate():
    buf = make(3000, n_envs=3)
    record, _ = fill(buf, 3, 300, seed=5)
    keys = check_batch(buf.sample(3000), record)  # images carry the env id in pixel 0: checked exactly
    assert {k[0] for k in keys} == {0, 1, 2}


def test_sampling_is_uniform():
    buf = make(40)
    _, rows = fill(buf, 1, 100)
    expected = expected_transitions(rows, buf.rows_per_env)
    draws = 200 * len(expected)
    counts = {}
    for s in buf.sample(draws).obs_state.numpy():
        counts[_key(s)] = counts.get(_key(s), 0) + 1
    assert set(counts) == expected
    assert min(counts.values()) > 150 and max(counts.values()) < 250  # ~7 sigma around 200


def test_add_after_an_episode_end_needs_start_episode():
    buf = make(100, n_envs=2)
    fill(buf, 2, 3)
    obs = {"image": np.zeros((2, STACK, H, W), np.uint8), "state": np.zeros((2, STATE_DIM), np.float32)}
    step = (np.zeros((2, ACTION_DIM), np.float32), np.zeros(2, np.float32), obs)
    buf.add(*step, np.array([True, False]), np.array([False, False]))
    with pytest.raises(RuntimeError, match=r"start_episode for env ids \[0\]"):
        buf.add(*step, np.array([False, False]), np.array([False, False]))


def test_empty_buffer_cannot_sample():
    buf = make(100)
    buf.start_episode({"image": np.zeros((1, STACK, H, W), np.uint8), "state": np.zeros((1, STATE_DIM))})
    assert len(buf) == 0
    with pytest.raises(RuntimeError, match="no transitions"):
        buf.sample(1)


def test_bytes_per_transition():
    row = ReplayBuffer.bytes_per_row((84, 84), 13, 2)
    assert row <= 8192
    assert row <= 1.1 * (84 * 84 + 4 * (13 + 2 + 1))  # one frame + state, action, reward
    buf = ReplayBuffer(1000, (84, 84), 4, 13, 2, num_envs=4)
    assert buf.nbytes == 1000 * row


def test_memory_check_names_the_largest_buffer_size_that_fits():
    row = ReplayBuffer.bytes_per_row((84, 84), 13, 2)
    available = 1_000_000 * row
    largest = 800_000  # 80% of the available memory
    check_memory(largest, (84, 84), 13, 2, available_bytes=available)
    with pytest.raises(ConfigError, match=rf"agent\.buffer_size<={largest}\b") as err:
        check_memory(largest + 1, (84, 84), 13, 2, available_bytes=available)
    assert f"{available:,} bytes" in str(err.value) and f"{(largest + 1) * row:,} bytes" in str(err.value)


def test_too_small_capacity_is_a_config_error():
    with pytest.raises(ConfigError, match="agent.buffer_size"):
        make(2 * STACK, n_envs=2)


def test_state_dict_round_trip_continues_exactly():
    a = make(60, n_envs=2, seed=1)
    fill(a, 2, 100)
    a.sample(8)  # advance the rng so its state matters
    b = make(60, n_envs=2, seed=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(3):
        for x, y in zip(a.sample(32, n_step=2, gamma=0.9), b.sample(32, n_step=2, gamma=0.9)):
            assert torch.equal(x, y)
    obs = {"image": np.full((2, STACK, H, W), 7, np.uint8), "state": np.ones((2, STATE_DIM), np.float32)}
    for buf in (a, b):  # both continue writing identically
        no = np.zeros(2, dtype=bool)
        buf.add(np.ones((2, ACTION_DIM), np.float32), np.ones(2, np.float32), obs, no, no)
    assert len(a) == len(b)
    for x, y in zip(a.sample(64), b.sample(64)):
        assert x is y is None or torch.equal(x, y)  # a one-step batch has no discount of its own


def test_load_state_dict_refuses_other_shapes():
    a = make(60)
    with pytest.raises(ValueError, match="agent.buffer_size"):
        make(80).load_state_dict(a.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch():
    buf = ReplayBuffer(100, (H, W), STACK, STATE_DIM, ACTION_DIM, device="cuda")
    record, _ = fill(buf, 1, 50)
    b = buf.sample(32)
    assert all(t.device.type == "cuda" for t in b if t is not None)
    check_batch(Batch(*(None if t is None else t.cpu() for t in b)), record)
    assert buf.sample(32, n_step=3, gamma=0.9).discount.device.type == "cuda"


def test_an_interrupted_step_is_not_stored_and_ends_its_stream_episode():
    """#35: a step the simulator was lost in never happened. Nothing of it is stored for that env (the other env's
    step is), its episode ends on the observation acted on, and the transition before bootstraps from it."""
    buf = make(100, n_envs=2)

    def obs(code: float) -> dict[str, np.ndarray]:
        return {"image": np.full((2, STACK, H, W), int(code), np.uint8),
                "state": np.full((2, STATE_DIM), code, np.float32)}

    buf.start_episode(obs(0))
    a, r = np.zeros((2, ACTION_DIM), np.float32), np.ones(2, np.float32)
    no = np.zeros(2, dtype=bool)
    buf.add(a, r, obs(1), no, no)
    assert len(buf) == 2
    buf.add(a, r * 5, obs(2), no, np.array([False, True]), interrupted=np.array([False, True]))
    assert len(buf) == 3  # env 0's second step only
    with pytest.raises(RuntimeError, match=r"env ids \[1\]"):
        buf.add(a, r, obs(3), no, no)  # env 1's episode ended with the interruption
    batch = buf.sample(200)
    stored = {(float(s[0]), float(n[0]), float(rw)) for s, n, rw in
              zip(batch.obs_state.numpy(), batch.next_state.numpy(), batch.reward.numpy())}
    assert stored == {(0.0, 1.0, 1.0), (1.0, 2.0, 5.0)}  # env 1's step 1 -> 2 (reward 5) is nowhere
    assert torch.all(batch.done == 0)  # the step before the interruption bootstraps
