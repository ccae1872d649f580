"""What a checkpoint holds besides the agent, and how a run picks it up again (``trainer.resume``).

A resumed run replays the uninterrupted one: the env step and episode counters, every random generator (the
trainer's, Python's, numpy's, torch's) and, with ``trainer.checkpoint_buffer``, the replay buffer come back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from av_td3.agent.base import Agent
from av_td3.agent.td3 import Spec
from av_td3.checkpoint import CheckpointManager, check_compatible, load
from av_td3.config import Config, ConfigError
from av_td3.replay import ReplayBuffer


def compat(cfg: Config, spec: Spec) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that loads it (checked by ``check_compatible``): the
    shapes, and the optimizer and clip mode whose state the checkpoint holds (an Adam state does not resume SGD;
    the clip strategies further check that their own state fits, e.g. AutoClip's agent.clip.window)."""
    a, e = cfg.agent, cfg.env
    return {"image": [e.image.stack, e.image.height, e.image.width], "state_dim": spec.state_dim,
            "encoder": a.encoder, "features_dim": a.features_dim, "hidden_dim": a.hidden_dim,
            "hidden_layers": a.hidden_layers, "num_critics": a.num_critics, "use_state": a.use_state,
            "num_envs": e.num_envs, "agent.optimizer": a.optimizer, "agent.clip.mode": a.clip.mode}


# compat() keys added on 2026-12-06, for checkpoints written before them: the value all of them had, or None where it
# cannot be known (the clip mode: then the clip strategies' own check of their state decides).
PREDATED: dict[str, Any] = {"agent.optimizer": "adam", "agent.clip.mode": None}


def find(resume: str, trust: bool, ckpt: CheckpointManager) -> tuple[dict, Path] | None:
    """The checkpoint ``trainer.resume`` asks for, read onto the CPU, and its path; None when there is none to
    resume (``none``, or ``auto`` in a fresh run dir). The RNG states must be CPU tensors, the buffer is numpy,
    and the agent and its optimizers move what they load onto their own device."""
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.load_latest("cpu", trust)
    path = Path(resume)
    if path.name == "latest":
        path = path.parent / path.read_text().strip()
    if not path.exists():
        raise ConfigError(f"trainer.resume={resume}: no such checkpoint file. Give an existing .pt path, "
                          "or trainer.resume=auto.")
    return load(path, "cpu", trust), path


def restore(state: dict, path: Path, want_compat: dict[str, Any], agent: Agent, buffer: ReplayBuffer | None,
            rng: np.random.Generator) -> None:
    """Load checkpoint ``state`` (read from ``path``) into the agent, the replay buffer (when the checkpoint
    holds one and the agent learns) and every random generator, after checking it was made for a compatible
    configuration (``want_compat``: this run's :func:`compat`)."""
    saved = {**PREDATED, **state["compat"]}
    check_compatible(saved, {k: v for k, v in want_compat.items() if saved.get(k, v) is not None}, path)
    agent.load_state_dict(state["agent"])
    if "buffer" in state and buffer is not None:
        try:
            buffer.load_state_dict(state["buffer"])
        except ValueError as e:
            raise ConfigError(f"checkpoint {path}: {e}. Resume with the configuration it was made with, or "
                              "start fresh with trainer.resume=none in a new output dir.") from e
    restore_rng(rng, state["rng"])


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """Every random generator's state: the trainer's ``rng``, Python's, numpy's and torch's global ones."""
    return {"trainer": rng.bit_generator.state, "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["trainer"]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
