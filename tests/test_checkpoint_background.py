"""Checkpoints written in a background thread: the file holds the state of the moment ``save_checkpoint`` was
called however training goes on, a failed write is raised in the training thread, and no way out of
``Trainer.train`` leaves a write in flight."""

from __future__ import annotations

import copy
import errno
import logging
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from av_td3 import replay
from av_td3.agent.monitor import NonFiniteError
from av_td3.checkpoint import load
from av_td3.config import Config
from av_td3.envs.base import SimulatorLostError
from av_td3.replay import ReplayBuffer
from av_td3.train import Interrupted, Preempted, Trainer
from tests.test_config import load as load_config

# Tiny runs: 24x24 frames, a 50-row buffer (full after 50 steps), a checkpoint due every 20 steps (a single env
# writes it at the next episode end, at most 25 steps later).
ARGS = ("debug=smoke", "trainer.total_steps=60", "trainer.learning_starts=20", "trainer.eval_every=1000",
        "trainer.checkpoint_every=20", "trainer.log_every=1000", "agent.batch_size=8", "agent.buffer_size=50",
        "env.image.height=24", "env.image.width=24", "env.max_episode_steps=25")


def config(*extra: str, resume: str = "none") -> Config:
    return load_config(*ARGS, *extra, f"trainer.resume={resume}")


def store_random(buf: ReplayBuffer, steps: int, seed: int, state_dim: int, action_dim: int) -> None:
    """``steps`` random transitions into ``buf``, as the loop stores them (episodes of 7 steps)."""
    rng = np.random.default_rng(seed)
    n = buf.num_envs

    def obs() -> dict[str, np.ndarray]:
        return {"image": rng.integers(0, 256, (n, buf.stack, *buf.frame_shape), dtype=np.uint8),
                "state": rng.normal(size=(n, state_dim)).astype(np.float32)}

    buf.start_episode(obs())
    for t in range(1, steps + 1):
        ended = np.full(n, t % 7 == 0)
        buf.add(rng.uniform(-1, 1, (n, action_dim)).astype(np.float32), rng.normal(size=n).astype(np.float32),
                obs(), ended, np.zeros(n, dtype=bool))
        if ended.any():
            buf.start_episode(obs())


def store(trainer: Trainer, steps: int, seed: int) -> None:
    store_random(trainer.buffer, steps, seed, trainer.spec.state_dim, trainer.spec.action_dim)


def update(trainer: Trainer, times: int) -> None:
    for _ in range(times):
        trainer.agent.update(trainer.buffer.sample(trainer.cfg.agent.batch_size), trainer.step)


def assert_equal(saved: Any, expected: Any, where: str = "state") -> None:
    """Every tensor equal (dtype, shape and values), every other value equal, in the same structure."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(saved, torch.Tensor) and saved.dtype == expected.dtype, where
        assert torch.equal(saved.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert isinstance(saved, dict) and saved.keys() == expected.keys(), where
        for k in expected:
            assert_equal(saved[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(saved) == len(expected), where
        for i, (a, b) in enumerate(zip(saved, expected)):
            assert_equal(a, b, f"{where}[{i}]")
    else:
        assert saved == expected, where


def differs(a: Any, b: Any) -> bool:
    try:
        assert_equal(a, b)
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("available", [None, 1000], ids=["copied", "no_room_for_a_copy"])
def test_a_buffer_snapshot_is_the_state_dict_of_its_moment(monkeypatch, available: int | None) -> None:
    """Compressed later (from a copy) or, without the memory for a copy, at once: either way the result is what
    state_dict() gave when snapshot() was called, although the buffer has stored more rows since, over old ones."""
    buf = ReplayBuffer(40, (16, 16), 2, 5, 2, num_envs=2, seed=3)
    store_random(buf, 50, seed=1, state_dim=5, action_dim=2)  # wrapped: the next rows overwrite stored ones
    expected = buf.state_dict()
    if available is not None:
        monkeypatch.setattr(replay.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    pack = buf.snapshot()
    store_random(buf, 15, seed=2, state_dim=5, action_dim=2)
    assert differs(buf.state_dict(), expected)
    if available is not None:  # compressed already: nothing left to compress later
        monkeypatch.setattr(replay, "_pack", lambda a: pytest.fail("compressed after snapshot() returned"))
    assert_equal(pack(), expected)


def test_the_file_holds_the_state_of_the_call_while_training_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    """The write is held back until the loop has stored more transitions (over rows the checkpoint holds: the
    buffer is full) and updated the agent (its weights and optimizer moments change in place); the file still
    holds every tensor as it was when save_checkpoint was called, and a resumed trainer gets exactly that."""
    trainer = Trainer(config(), tmp_path / "run")
    store(trainer, 60, seed=1)  # wrapped: every row of the 50 is in use
    update(trainer, 4)  # the optimizers hold their moments
    trainer.step = 60
    expected = {"step": 60, "agent": copy.deepcopy(trainer.agent.state_dict()),
                "buffer": trainer.buffer.state_dict()}

    gate = threading.Event()
    pack = replay._pack

    def held_back(a: np.ndarray) -> dict:
        # in the training thread, waiting would never end: the loop would be the one compressing
        assert threading.current_thread() is not threading.main_thread(), "compressed before save_checkpoint returned"
        gate.wait()
        return pack(a)

    monkeypatch.setattr(replay, "_pack", held_back)
    caplog.set_level(logging.INFO, logger="av_td3.train")
    try:
        path = trainer.save_checkpoint()
        store(trainer, 20, seed=2)  # what the loop does next
        update(trainer, 4)
        trainer.step += 20
        assert not path.exists() and "checkpoint written" not in caplog.text  # still being written
    finally:
        gate.set()
    trainer.ckpt.wait()
    monkeypatch.setattr(replay, "_pack", pack)
    assert f"checkpoint written: {path}" in caplog.text
    assert (path.parent / "latest").read_text() == path.name

    saved = load(path)
    assert saved["step"] == expected["step"]
    assert_equal(saved["agent"], expected["agent"], "agent")
    assert_equal(saved["buffer"], expected["buffer"], "buffer")
    # the loop did change what the file holds: the test would see a copy taken too late
    assert differs(trainer.agent.state_dict(), expected["agent"])
    assert differs(trainer.buffer.state_dict()["rows"], expected["buffer"]["rows"])

    trainer.logger.close()  # as train() does on the way out
    resumed = Trainer(config(resume="auto"), tmp_path / "run")
    assert resumed.resumed_from == path and resumed.step == 60
    assert_equal(resumed.agent.state_dict(), expected["agent"], "resumed agent")
    assert_equal(resumed.buffer.state_dict(), expected["buffer"], "resumed buffer")


def _disk_full(obj: Any, f: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_background_write_is_raised_at_the_next_checkpoint(tmp_path: Path, monkeypatch) -> None:
    trainer = Trainer(config(), tmp_path / "run")
    store(trainer, 10, seed=1)
    monkeypatch.setattr(torch, "save", _disk_full)
    trainer.save_checkpoint()  # returns: the write fails in the background
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_checkpoint()
    trainer.ckpt.wait()  # reported once
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert not (ckpt_dir / "latest").exists() and not list(ckpt_dir.glob(".*.tmp")) and not list(ckpt_dir.glob("*.pt"))


@pytest.mark.parametrize("every", [20, 1000], ids=["next_checkpoint", "end_of_run"])
def test_a_failed_background_write_fails_the_run(tmp_path: Path, monkeypatch, every: int) -> None:
    """Raised by the next checkpoint, which stops the loop; or, when the final checkpoint is the only one, by
    train() after the loop."""
    trainer = Trainer(config(f"trainer.checkpoint_every={every}"), tmp_path / "run")
    monkeypatch.setattr(torch, "save", _disk_full)
    save_checkpoint, calls, raised_by = trainer.save_checkpoint, [], []

    def recording_save() -> Path:
        calls.append(trainer.step)
        try:
            return save_checkpoint()
        except OSError:
            raised_by.append(len(calls))
            raise

    monkeypatch.setattr(trainer, "save_checkpoint", recording_save)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    assert trainer.summary.status == "failed" and "No space left" in trainer.summary.reason
    assert raised_by == ([2] if every == 20 else []), (calls, raised_by)
    assert calls[-1] == trainer.step and (every == 20 or calls == [60])
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


STOPS = {  # what stops the run right after the first periodic checkpoint call, and the status it leaves
    "completed": (None, "completed"),
    "nan_guard": (lambda t: NonFiniteError("critic loss", t.step), "stopped"),
    "sigterm": ("signal", "stopped"),
    "preempted": (lambda t: Preempted(signal.SIGUSR2, lambda *args: None), "stopped"),
    "simulator_lost": (lambda t: SimulatorLostError("no CARLA server"), "stopped"),
    "crash": (lambda t: RuntimeError("a bug"), "failed"),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_every_way_out_of_train_leaves_a_complete_checkpoint_that_resumes(tmp_path: Path, monkeypatch,
                                                                          stop: str) -> None:
    """Each write takes 0.3 s more, so a write is still in flight when the run stops right after the first
    periodic checkpoint call; when train() returns or raises, ``latest`` names a complete file of the step the
    run stopped at (its last checkpoint when it crashed), and a new trainer resumes from it."""
    make_error, status = STOPS[stop]
    save = torch.save

    def slow_save(obj: Any, f: Any) -> None:
        time.sleep(0.3)
        save(obj, f)

    monkeypatch.setattr(torch, "save", slow_save)
    trainer = Trainer(config(), tmp_path / "run")
    called_at: list[int] = []
    save_checkpoint, env_step = trainer.save_checkpoint, trainer.envs.step

    def recording_save() -> Path:
        called_at.append(trainer.step)
        return save_checkpoint()

    def step(action: np.ndarray) -> tuple:
        if called_at and make_error == "signal":
            trainer.signals.received = signal.SIGTERM  # as the handler records it; the loop checks next step
        elif called_at and make_error is not None:
            raise make_error(trainer)
        return env_step(action)

    monkeypatch.setattr(trainer, "save_checkpoint", recording_save)
    monkeypatch.setattr(trainer.envs, "step", step)
    if make_error is None:
        trainer.train()
    else:
        with pytest.raises(Interrupted if make_error == "signal" else type(make_error(trainer))):
            trainer.train()
    assert trainer.summary.status == status

    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert latest.exists(), "train() ended with the checkpoint still being written"
    state = load(latest.parent / latest.read_text())
    want = called_at[0] if status == "failed" else trainer.step
    assert state["step"] == want and "buffer" in state
    monkeypatch.setattr(torch, "save", save)
    resumed = Trainer(config(resume="auto"), tmp_path / "run")
    assert resumed.step == want and resumed.resumed_from == latest.parent / latest.read_text()
