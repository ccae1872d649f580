"""Replay buffer for stacked-frame observations that stores each frame once.

Row model: every row of a stream is one observation (its newest frame, its state vector and its step in the
episode). A row from which a transition was taken also holds that transition's action, reward, terminated and
truncated; its next observation is the next row of the same stream. When an episode ends, its final observation
is stored as a row with no transition, so the last transition's next observation is the true final one and the
next episode's first observation starts a fresh row.

Frame stacks are rebuilt at sample time: the frame ``d`` steps back from a row of episode step ``t`` is the row
``min(d, t)`` back, which repeats the episode's first frame exactly as the env's frame stack
(:class:`av_td3.envs.base.DrivingEnv`) does. Compared with storing ``obs`` and ``next_obs`` stacks this takes
``2 * stack`` times less image memory (~7 KB instead of 56 KB per 4x84x84 transition, 226 KB as float32).

Each of ``num_envs`` vectorised envs writes its own ring-buffer stream (arrays are ``[num_envs, rows_per_env,
...]``), so consecutive rows of a stream are consecutive steps of one env.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import psutil
import torch

from av_td3.config import ConfigError

# The buffer may take at most this share of the memory available at start-up; the rest is left for the
# simulator, the networks and the OS.
MEMORY_SHARE = 0.8

# Sampling draws candidate rows uniformly and keeps the valid ones; each round oversamples by the known
# acceptance rate, so one round almost always suffices and this bound is never reached in practice.
_MAX_SAMPLE_ROUNDS = 100


def _row_layout(frame_shape: tuple[int, int], state_dim: int, action_dim: int) -> dict[str, tuple[tuple, type]]:
    """Per-row fields as name -> (shape, dtype); the single source of both allocation and the byte count."""
    return {
        "frame": (tuple(frame_shape), np.uint8),     # newest grayscale frame of the observation
        "state": ((state_dim,), np.float32),
        "step": ((), np.int32),                      # steps since the episode's first observation (0 = first)
        "action": ((action_dim,), np.float32),       # the rest: the transition taken from this row, if any
        "reward": ((), np.float32),
        "terminated": ((), np.bool_),
        "truncated": ((), np.bool_),
        "has_action": ((), np.bool_),                # False for final observations and the newest row
    }


def bytes_per_row(frame_shape: tuple[int, int], state_dim: int, action_dim: int) -> int:
    """Bytes one stored row (one observation plus the transition taken from it) occupies."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize
               for shape, dtype in _row_layout(frame_shape, state_dim, action_dim).values())


def check_memory(capacity: int, frame_shape: tuple[int, int], state_dim: int, action_dim: int,
                 available_bytes: int | None = None) -> None:
    """Raise :class:`ConfigError` if ``capacity`` rows would take more than ``MEMORY_SHARE`` of the available
    memory (``available_bytes``, default: ``psutil.virtual_memory().available``). The message gives the bytes
    needed and available and the largest ``agent.buffer_size`` that fits."""
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    row = bytes_per_row(frame_shape, state_dim, action_dim)
    needed = capacity * row
    allowed = int(available_bytes * MEMORY_SHARE)
    if needed > allowed:
        raise ConfigError(
            f"agent.buffer_size={capacity} needs {needed:,} bytes ({needed / 2**30:.2f} GiB, {row:,} bytes per "
            f"transition) for the replay buffer, but only {available_bytes:,} bytes "
            f"({available_bytes / 2**30:.2f} GiB) are available and the buffer may use at most "
            f"{MEMORY_SHARE:.0%} of that: set agent.buffer_size<={allowed // row} or free memory.")


class Batch(NamedTuple):
    """A sampled batch, all tensors on the buffer's device. Images stay uint8 (0-255); the agent converts them
    to float once on the training device. ``obs_image`` and ``next_image`` are overlapping (non-contiguous)
    views of one [B, stack + 1, H, W] frame window, so treat them as read-only."""
    obs_image: torch.Tensor   # uint8 [B, stack, H, W], oldest frame first
    obs_state: torch.Tensor   # float32 [B, k]
    action: torch.Tensor      # float32 [B, a]
    reward: torch.Tensor      # float32 [B]
    next_image: torch.Tensor  # uint8 [B, stack, H, W]
    next_state: torch.Tensor  # float32 [B, k]
    done: torch.Tensor        # float32 [B], 1 where the episode terminated (truncation bootstraps: 0)
    # float32 [B]: gamma ** m for an m-step reward sum (n-step sampling); None for one-step transitions, whose
    # discount is the agent's gamma
    discount: torch.Tensor | None = None


class ReplayBuffer:
    """Uniform replay over ``capacity`` rows split evenly across ``num_envs`` env streams.

    Usage per env step: :meth:`start_episode` with each env's first observation (all envs at the start, then
    the ended ones), then :meth:`add` with the batched step results. Each env step takes one row per env, and
    one more per ended episode, so the buffer holds slightly fewer than ``capacity`` transitions.
    """

    def __init__(self, capacity: int, frame_shape: tuple[int, int], stack: int, state_dim: int, action_dim: int,
                 num_envs: int = 1, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.rows_per_env = capacity // num_envs  # a remainder of capacity % num_envs rows is left unused
        if self.rows_per_env < stack + 1:
            # Fewer rows could hold no transition whose whole stack window and next row fit.
            raise ConfigError(f"agent.buffer_size={capacity} gives {self.rows_per_env} rows per env for "
                              f"{num_envs} envs; need at least stack + 1 = {stack + 1}: raise agent.buffer_size.")
        check_memory(capacity, frame_shape, state_dim, action_dim)
        self.frame_shape = tuple(frame_shape)
        self.stack = stack
        self.num_envs = num_envs
        self.device = torch.device(device)
        self._rows = {name: np.zeros((num_envs, self.rows_per_env, *shape), dtype=dtype)
                      for name, (shape, dtype) in _row_layout(frame_shape, state_dim, action_dim).items()}
        self._ptr = np.zeros(num_envs, dtype=np.int64)    # slot the next row of each stream goes to
        self._size = np.zeros(num_envs, dtype=np.int64)   # rows written to each stream, capped at rows_per_env
        # A stream whose episode ended (or never started) must get start_episode before the next add.
        self._needs_start = np.ones(num_envs, dtype=bool)
        self._rng = np.random.default_rng(seed)

    bytes_per_row = staticmethod(bytes_per_row)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the stored rows."""
        return sum(a.nbytes for a in self._rows.values())

    # ----------------------------------------------------------------------------------------------- writing
    def _write_obs(self, env: np.ndarray, obs: dict[str, np.ndarray], step: np.ndarray) -> None:
        """Append one observation row to each stream in ``env`` (observations batched in the same order)."""
        slot = self._ptr[env]
        r = self._rows
        r["frame"][env, slot] = obs["image"][:, -1]
        r["state"][env, slot] = obs["state"]
        r["step"][env, slot] = step
        r["has_action"][env, slot] = False  # the slot may hold an overwritten transition
        self._ptr[env] = (slot + 1) % self.rows_per_env
        self._size[env] = np.minimum(self._size[env] + 1, self.rows_per_env)

    def start_episode(self, obs: dict[str, np.ndarray], env_ids: np.ndarray | None = None) -> None:
        """Store the first observation of a new episode for the streams ``env_ids`` (default: all).
        ``obs``: image uint8 [n, stack, H, W], state float32 [n, k], n = len(env_ids)."""
        env = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64).reshape(-1)
        self._write_obs(env, obs, np.zeros(len(env), dtype=np.int32))
        self._needs_start[env] = False

    def add(self, action: np.ndarray, reward: np.ndarray, next_obs: dict[str, np.ndarray],
            terminated: np.ndarray, truncated: np.ndarray, interrupted: np.ndarray | None = None) -> None:
        """Record one step of every env: action float32 [n, a], reward [n], ``next_obs`` the observation after
        the step (for an ended episode its final observation; image [n, stack, H, W], state [n, k]), terminated
        and truncated bool [n]. Then call :meth:`start_episode` for the envs whose episode ended.

        ``interrupted`` (bool [n]): those envs' steps never happened (a lost simulator); nothing of them is
        stored and their episode ends on the observation acted on, which keeps no action: the transition before
        it bootstraps from it, as from any episode's last row."""
        if self._needs_start.any():
            raise RuntimeError(f"ReplayBuffer.add: call start_episode for env ids "
                               f"{np.flatnonzero(self._needs_start).tolist()} first (their episode ended or "
                               f"never started)")
        skip = np.zeros(self.num_envs, dtype=bool) if interrupted is None else np.asarray(interrupted, dtype=bool)
        env = np.flatnonzero(~skip)
        cur = (self._ptr[env] - 1) % self.rows_per_env  # each stream's newest row: the observation acted on
        r = self._rows
        r["action"][env, cur] = np.asarray(action)[env]
        r["reward"][env, cur] = np.asarray(reward)[env]
        r["terminated"][env, cur] = np.asarray(terminated)[env]
        r["truncated"][env, cur] = np.asarray(truncated)[env]
        r["has_action"][env, cur] = True
        self._write_obs(env, {k: v[env] for k, v in next_obs.items()}, r["step"][env, cur] + 1)
        self._needs_start |= np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool) | skip

    # ---------------------------------------------------------------------------------------------- sampling
    def _is_transition(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Whether a transition starts at each (env, slot): the row has an action and its stack window (back to
        the episode start, at most stack - 1 rows) has not been overwritten. Its next row is newer than the row
        itself, so it is intact too, and so is the next row's window."""
        oldest = (self._ptr[env] - self._size[env]) % self.rows_per_env
        age = (slot - oldest) % self.rows_per_env  # rows between the stream's oldest live row and this one
        window = np.minimum(self.stack - 1, self._rows["step"][env, slot])
        return self._rows["has_action"][env, slot] & (age >= window)

    def __len__(self) -> int:
        """Number of transitions :meth:`sample` can return."""
        # Only the stack - 1 oldest rows of a stream can have an overwritten window; check just those.
        env = np.repeat(np.arange(self.num_envs), self.stack - 1)
        oldest = (self._ptr - self._size) % self.rows_per_env
        slot = (oldest[env] + np.tile(np.arange(self.stack - 1), self.num_envs)) % self.rows_per_env
        broken = self._rows["has_action"][env, slot] & ~self._is_transition(env, slot)
        return int(np.count_nonzero(self._rows["has_action"]) - np.count_nonzero(broken))

    def _stack_rows(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Rows [B, stack] holding the frames of the observation at each (env, slot), oldest first. Frames before
        the episode start are the episode's first frame (the row ``min(d, step)`` back)."""
        back = np.minimum(np.arange(self.stack - 1, -1, -1), self._rows["step"][env, slot][:, None])
        return (slot[:, None] - back) % self.rows_per_env

    def _stack(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Frames uint8 [B, stack, H, W] of the observation at each (env, slot), oldest first."""
        return self._rows["frame"][env[:, None], self._stack_rows(env, slot)]

    def _n_step(self, env: np.ndarray, slot: np.ndarray, n_step: int, gamma: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For transitions starting at (env, slot): the discounted sum of up to ``n_step`` rewards, the row of the
        last transition summed and the number of transitions summed. The sum goes on while the next row has an
        action: an episode's final observation has none (the episode ended, terminated or truncated), nor has the
        stream's newest row. Rows after a sampled row are newer, so never overwritten ones. A loop over the n steps,
        not over samples."""
        r = self._rows
        total = r["reward"][env, slot].astype(np.float64)
        last = slot.copy()
        steps = np.ones(len(slot), dtype=np.int64)
        going = np.ones(len(slot), dtype=bool)
        for k in range(1, n_step):
            row = (slot + k) % self.rows_per_env
            going &= r["has_action"][env, row]
            total += np.where(going, gamma ** k * r["reward"][env, row], 0.0)
            last = np.where(going, row, last)
            steps += going
        return total, last, steps

    def _window(self, env: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Frames uint8 [B, stack + 1, H, W]: the stack of the observation at (env, slot), oldest first, then the
        next row's frame. Frames before the episode start are the episode's first frame.

        The next observation's stack is ``window[:, 1:]``: its step is one more, so its frame ``d >= 1`` back is
        the observation's frame ``d - 1`` back, the same shift the env's frame stack does. Gathering the shared
        frames once saves a copy and, on cuda, half the host-to-device transfer."""
        rows = np.concatenate([self._stack_rows(env, slot), (slot[:, None] + 1) % self.rows_per_env], axis=1)
        return self._rows["frame"][env[:, None], rows]

    def _draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(env, slot) of ``batch_size`` transitions drawn uniformly with replacement, by rejection: draw rows
        uniformly over all written rows, keep those that start a transition."""
        valid = len(self)
        if valid == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer holds no transitions yet")
        written = int(self._size.sum())
        first_row = np.cumsum(self._size) - self._size  # flat index of each stream's first written row
        oldest = (self._ptr - self._size) % self.rows_per_env
        envs, slots, found = [], [], 0
        for _ in range(_MAX_SAMPLE_ROUNDS):
            n = math.ceil((batch_size - found) * written / valid * 1.2) + 16
            flat = self._rng.integers(0, written, size=n)
            env = np.searchsorted(first_row, flat, side="right") - 1
            slot = (oldest[env] + flat - first_row[env]) % self.rows_per_env
            keep = self._is_transition(env, slot)
            envs.append(env[keep])
            slots.append(slot[keep])
            found += int(keep.sum())
            if found >= batch_size:
                return np.concatenate(envs)[:batch_size], np.concatenate(slots)[:batch_size]
        raise RuntimeError(f"ReplayBuffer.sample: found {found} of {batch_size} transitions after "
                           f"{_MAX_SAMPLE_ROUNDS} rounds")

    def _to_device(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        if self.device.type == "cuda":
            # Pinned memory lets the copy run asynchronously; the caching host allocator keeps the pinned block
            # alive until the copy has finished.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def sample(self, batch_size: int, n_step: int = 1, gamma: float = 1.0) -> Batch:
        """``batch_size`` transitions drawn uniformly (with replacement) from the valid ones. With ``n_step > 1``
        each reward is the ``gamma``-discounted sum of up to ``n_step`` rewards (fewer where the episode ends or
        the stream's newest row comes first), the next observation the one after the last of them and
        ``discount`` ``gamma ** m`` for m rewards summed (``agent.n_step``)."""
        env, slot = self._draw(batch_size)
        r = self._rows
        # last: the row of the last transition summed; nxt: the row of the observation to bootstrap from
        if n_step == 1:
            last, nxt = slot, (slot + 1) % self.rows_per_env
            reward, discount = r["reward"][env, slot], None
            window = self._to_device(self._window(env, slot))  # one gather for both stacks
            obs_image, next_image = window[:, :-1], window[:, 1:]
        else:
            total, last, steps = self._n_step(env, slot, n_step, gamma)
            nxt = (last + 1) % self.rows_per_env
            reward, discount = total.astype(np.float32), self._to_device((gamma ** steps).astype(np.float32))
            obs_image = self._to_device(self._stack(env, slot))
            next_image = self._to_device(self._stack(env, nxt))
        return Batch(
            obs_image=obs_image,
            obs_state=self._to_device(r["state"][env, slot]),
            action=self._to_device(r["action"][env, slot]),
            reward=self._to_device(reward),
            next_image=next_image,
            next_state=self._to_device(r["state"][env, nxt]),
            done=self._to_device(r["terminated"][env, last].astype(np.float32)),
            discount=discount,
        )

    # ----------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The written rows, pointers and rng state, as tensors and plain values (a checkpoint loads them without
        unpickling code, see :mod:`av_td3.checkpoint`).

        Only the filled part is kept: slots ``[0, filled)`` of every stream, ``filled`` the most rows any stream
        holds (a stream fills its slots in order until it wraps, so the slots past its size were never written).
        Each row field is zlib-compressed (level 1) in chunks of ``_CHECKPOINT_CHUNK_BYTES``: rendered uint8
        frames shrink ~17x at ~200 MB/s. About 4.2 MB per 1k rows of 64x64 frames before compression."""
        return _packed(self._filled(copy=False))

    def snapshot(self) -> Callable[[], dict]:
        """:meth:`state_dict` in two halves, for a checkpoint written while training goes on: now, a copy of the
        filled rows and the pointers (a memory copy, ~4.2 MB per 1k rows of 64x64 frames); the returned function
        then compresses that copy into exactly what :meth:`state_dict` returned at this moment, whatever the
        buffer stored since (call it once, e.g. in a background thread).

        When the copy would take more than ``MEMORY_SHARE`` of the available memory, the rows are compressed now
        instead (in bounded chunks, as :meth:`state_dict` does): slower for the caller, but never a second
        full-size buffer in memory."""
        filled = int(self._size.max())
        copy_bytes = sum(rows[:, :filled].nbytes for rows in self._rows.values())
        if copy_bytes > MEMORY_SHARE * psutil.virtual_memory().available:
            packed = self.state_dict()
            return lambda: packed
        return partial(_packed, self._filled(copy=True))

    def _filled(self, copy: bool) -> dict:
        """:meth:`state_dict` with the row fields uncompressed: ``[num_envs, filled, ...]`` views of the buffer's
        arrays, or copies of them (``copy``)."""
        filled = int(self._size.max())
        return {"rows_per_env": self.rows_per_env, "filled": filled,
                "rows": {name: rows[:, :filled].copy() if copy else rows[:, :filled]
                         for name, rows in self._rows.items()},
                "ptr": torch.from_numpy(self._ptr.copy()), "size": torch.from_numpy(self._size.copy()),
                "needs_start": torch.from_numpy(self._needs_start.copy()), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        """Restore a :meth:`state_dict` into a buffer of the same ``agent.buffer_size``, row shapes and
        ``num_envs``. Also reads format 1 (every allocated row, as numpy arrays). Raises ValueError naming the
        field and the setting that changed."""
        if "rows" not in d:  # format 1: each field was a whole [num_envs, rows_per_env, ...] array
            filled = self.rows_per_env
            for name, rows in self._rows.items():
                saved = np.asarray(d[name])
                _check_field(name, saved.shape, saved.dtype, rows, filled)
                np.copyto(rows, saved)
        else:
            if d["rows_per_env"] != self.rows_per_env:
                raise ValueError(f"replay buffer checkpoint has {d['rows_per_env']} rows per env, this buffer "
                                 f"{self.rows_per_env}: agent.buffer_size or env.num_envs changed")
            filled = d["filled"]
            for name, rows in self._rows.items():
                packed = d["rows"][name]
                _check_field(name, tuple(packed["shape"]), np.dtype(packed["dtype"]), rows, filled)
                _unpack_into(packed, rows[:, :filled], name)
        # Slots past `filled` were never written in the saved buffer; only has_action is read there (by __len__).
        self._rows["has_action"][:, filled:] = False
        self._ptr[:] = np.asarray(d["ptr"])
        self._size[:] = np.asarray(d["size"])
        self._needs_start[:] = np.asarray(d["needs_start"])
        self._rng.bit_generator.state = d["rng"]


# Raw bytes per compressed chunk of a checkpointed row field: small enough that packing and unpacking never hold a
# second copy of a large field, large enough that zlib's 32 KB window and the per-chunk overhead don't matter.
_CHECKPOINT_CHUNK_BYTES = 16 << 20


def _packed(state: dict) -> dict:
    """A :meth:`ReplayBuffer._filled` state with each row field compressed by :func:`_pack`."""
    return {**state, "rows": {name: _pack(rows) for name, rows in state["rows"].items()}}


def _pack(a: np.ndarray) -> dict:
    """A row field ``[num_envs, filled, ...]`` as ``{"dtype", "shape", "chunks"}``: the C-order bytes of each
    stream, cut into whole rows of at most ``_CHECKPOINT_CHUNK_BYTES`` and each zlib-compressed into a uint8
    tensor. Lossless; zlib's checksum catches a corrupted chunk on load."""
    row_bytes = max(1, math.prod(a.shape[2:]) * a.itemsize)
    per_chunk = max(1, _CHECKPOINT_CHUNK_BYTES // row_bytes)
    # .data: the array's memoryview (numpy's stubs give ndarray the buffer protocol only for Python 3.12+)
    chunks = [torch.frombuffer(bytearray(zlib.compress(np.ascontiguousarray(stream[i:i + per_chunk]).data, 1)),
                               dtype=torch.uint8)
              for stream in a for i in range(0, a.shape[1], per_chunk)]
    return {"dtype": a.dtype.str, "shape": list(a.shape), "chunks": chunks}


def _check_field(name: str, shape: tuple, dtype: np.dtype, rows: np.ndarray, filled: int) -> None:
    """Raise ValueError unless a checkpointed row field fits this buffer's ``rows[:, :filled]``."""
    want = (rows.shape[0], filled, *rows.shape[2:])
    if tuple(shape) != want or dtype != rows.dtype:
        raise ValueError(f"replay buffer checkpoint field {name!r} is {dtype}{list(shape)}, this buffer expects "
                         f"{rows.dtype}{list(want)}: agent.buffer_size, the image/state shape or the env count "
                         "changed")


def _unpack_into(packed: dict, dest: np.ndarray, name: str) -> None:
    """Decompress a :func:`_pack` result chunk by chunk into ``dest`` ([num_envs, filled, ...], each stream
    contiguous), without a second full-size copy. Raises ValueError when a chunk is corrupt or the sizes
    disagree."""
    chunks = iter(packed["chunks"])
    try:
        for stream in dest:
            assert stream.flags.c_contiguous  # rows[e, :filled]: so the flat uint8 view below writes into it
            flat = stream.reshape(-1).view(np.uint8)
            pos = 0
            while pos < flat.size:
                raw = zlib.decompress(next(chunks).numpy())
                flat[pos:pos + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
                pos += len(raw)
    except (zlib.error, ValueError, StopIteration) as e:
        raise ValueError(f"replay buffer checkpoint field {name!r} is corrupt or cut short ({e!r})") from e
    if next(chunks, None) is not None:
        raise ValueError(f"replay buffer checkpoint field {name!r} holds more data than its shape")
