"""Shared fixtures."""

from __future__ import annotations

import pytest

from av_td3.config import EnvConfig, ImageConfig


@pytest.fixture
def smoke_env_cfg() -> EnvConfig:
    """A fast embedded-simulator config: racetrack, 2 NPCs, 32x32 frames stacked 2 deep, 100-step episodes."""
    return EnvConfig(name="highway", town="racetrack", npcs=2, image=ImageConfig(height=32, width=32, stack=2),
                     max_episode_steps=100)
