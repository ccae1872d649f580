"""``replay/*`` rows: bytes per stored transition, from the arrays actually allocated (``nbytes / capacity``):
ours at the fixed sizes (shapes from the trainer's :func:`av_td3.train.agent_spec`, as the trainer allocates it),
the least a transition fits in, and SB3's ``ReplayBuffer`` with and without ``optimize_memory_usage``."""

from __future__ import annotations

from collections.abc import Callable

from av_td3.bench.config import BenchConfig, fixed_env_config
from av_td3.bench.result import SB3_MISSING, BenchResult, Row
from av_td3.bench.sb3 import sb3_replay_bytes


def reference_bytes(cfg: BenchConfig) -> int:
    """One uint8 frame + the float32 state vector + float32 action + float32 reward: the least a transition can
    be stored in, in bytes."""
    from av_td3.train import agent_spec

    spec = agent_spec(fixed_env_config(cfg))
    return spec.height * spec.width + 4 * spec.state_dim + 4 * spec.action_dim + 4


def bench_replay(cfg: BenchConfig, result: BenchResult, say: Callable[[str], None]) -> None:
    """The ``replay/*`` rows, appended to ``result`` (SB3's skipped without it)."""
    from av_td3.replay import ReplayBuffer
    from av_td3.train import agent_spec

    spec = agent_spec(fixed_env_config(cfg))
    buf = ReplayBuffer(cfg.replay_capacity, (spec.height, spec.width), spec.stack, spec.state_dim, spec.action_dim)
    ours = buf.nbytes / cfg.replay_capacity
    result.rows.append(Row("replay/ours", "bytes/transition", [ours],
                           "newest frame + state + step + action + reward + flags, per row"))
    result.rows.append(Row("replay/reference", "bytes/transition", [float(reference_bytes(cfg))],
                           "one frame + state + action + reward"))
    for opt in (False, True):
        name = f"replay/sb3{'_optimize_memory_usage' if opt else ''}"
        try:
            value = sb3_replay_bytes(cfg, opt)
        except ImportError:
            result.skipped[name] = SB3_MISSING
            continue
        result.rows.append(Row(name, "bytes/transition", [value],
                               f"SB3 ReplayBuffer, optimize_memory_usage={opt}: stacked image obs (no state)"))
    say(f"replay: ours {ours:.0f} bytes/transition")
