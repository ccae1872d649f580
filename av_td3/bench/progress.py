"""What ``av-td3 bench`` says while it runs: before each section which one it is, k of n, and an estimate of its
duration from the preset's sizes; after it, the time it took.

The estimates multiply the sizes of :class:`av_td3.bench.config.BenchConfig` by the rough per-unit costs below.
They are estimates, not measurements: rounded from the full run of 2026-12-02 on an idle 2-core Xeon
(benchmarks/README.md, Results), where the full bench took about 6-7 min and ``--quick`` about 1.5 min. Another
CPU, or other processes on the same one, changes them several-fold.
"""

from __future__ import annotations

import math

from av_td3.bench.config import BenchConfig
from av_td3.progress import format_duration

# Rough costs in seconds on an idle 2-core CPU (see the module docstring).
UPDATE_S = 0.04             # one replay sample + TD3 update at 64-84 px frames, batch 64-128 (17-36 updates/s)
COMPILE_S = 20.0            # torch.compile of the encoder for update/ours_separate_compile (a guess)
MATMUL_FLOP_PER_S = 300e9   # float32 sgemm rate
ENV_STEP_S = 0.009          # one embedded-simulator step with 20 NPCs, random actions, resets included
RANDOM_STEP_S = 0.012       # a training step before learning starts: env step, storing, logging
TRAIN_STEP_S = 0.045        # a training step after learning starts: the env step and one update (~22 steps/s)
EVAL_STEP_S = 0.015         # an evaluation step: the policy's action and the env step
RUN_START_S = 5.0           # building a trainer (envs, agent, buffer, loggers) in this process
CHILD_RUN_START_S = 10.0    # a child `launch.py` process: imports, Hydra, the trainer
STORE_S = 2e-5              # one replay-buffer row stored while the checkpoint section fills the buffer
CHECKPOINT_S_PER_ROW = 1.6e-5  # one checkpoint, per buffer row (1.6 s for 100k rows: copies, zlib, write)
SECTION_MIN_S = 1.0


def estimate_s(section: str, cfg: BenchConfig) -> float:
    """The estimated duration of ``section`` in seconds at ``cfg``'s sizes, on an idle 2-core CPU (an estimate,
    see the module docstring)."""
    if section == "update":
        per_row = cfg.warmup_updates + cfg.update_reps * cfg.updates_per_rep + 2  # + the FLOP count's cycle
        matmuls = (cfg.warmup_updates + cfg.update_reps * cfg.updates_per_rep) * 2 * cfg.matmul_size ** 3
        compiled = sum(name.endswith("_compile") for name in cfg.update_rows)
        seconds = (len(cfg.update_rows) * (per_row * UPDATE_S + 1.0) + matmuls / MATMUL_FLOP_PER_S
                   + compiled * COMPILE_S)
    elif section == "replay":
        seconds = SECTION_MIN_S
    elif section == "env":  # three simulators (ours, highway-env's road queries, the bird's-eye view)
        seconds = 3 * (cfg.env_reps * cfg.env_steps_per_rep * ENV_STEP_S + 1.0)
    elif section == "e2e":
        seconds = _e2e_s(cfg)
    elif section == "checkpoint":
        seconds = _checkpoint_s(cfg)
    elif section == "regression":
        runs = 2 * cfg.regression_pairs * len(cfg.regression_threads)
        learning = cfg.regression_total_steps - cfg.regression_learning_starts
        seconds = runs * (CHILD_RUN_START_S + cfg.regression_learning_starts * RANDOM_STEP_S
                          + learning * TRAIN_STEP_S)
    elif section == "busy":  # next to two busy processes: each run gets about a third of a 2-core machine
        learning = cfg.regression_total_steps - cfg.regression_learning_starts
        seconds = 2 * cfg.busy_pairs * 3 * (CHILD_RUN_START_S + cfg.regression_learning_starts * RANDOM_STEP_S
                                            + learning * TRAIN_STEP_S)
    else:
        raise ValueError(f"unknown bench section {section!r}")
    return max(seconds, SECTION_MIN_S)


def _run_s(total: int, starts: int, episode_steps: int) -> float:
    """A short training run: start-up, random steps, learning steps, one final evaluation episode."""
    return RUN_START_S + starts * RANDOM_STEP_S + (total - starts) * TRAIN_STEP_S + episode_steps * EVAL_STEP_S


def _e2e_s(cfg: BenchConfig) -> float:
    """``e2e/default`` and SB3's run next to it (the same steps), then one fixed-size run per ``e2e_num_envs``."""
    from av_td3.bench.e2e import default_e2e_config

    t = default_e2e_config(cfg).trainer
    default = 2 * _run_s(t.total_steps, t.learning_starts, cfg.e2e_max_episode_steps)
    fixed = len(cfg.e2e_num_envs) * _run_s(cfg.e2e_total_steps, cfg.e2e_learning_starts,
                                           cfg.e2e_max_episode_steps)
    return default + fixed


def _checkpoint_s(cfg: BenchConfig) -> float:
    """A trainer, its buffer filled from recorded env steps, one untimed and ``checkpoint_reps`` timed checkpoints."""
    from av_td3.bench.checkpoint import checkpoint_config

    rows = checkpoint_config(cfg).agent.buffer_size
    return (RUN_START_S + cfg.checkpoint_env_steps * ENV_STEP_S + rows * STORE_S
            + (cfg.checkpoint_reps + 1) * rows * CHECKPOINT_S_PER_ROW)


def about(seconds: float) -> str:
    """An estimate in words, no more precise than it is: "about 15 s", "about 1.5 min", "about 12 min",
    "about 1 h 20 min"."""
    if seconds < 60:
        return f"about {max(5, 5 * math.ceil(seconds / 5))} s"
    if seconds < 600:
        return f"about {math.floor(seconds / 30 + 0.5) / 2:g} min"  # to the half minute
    minutes = math.floor(seconds / 60 + 0.5)
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


def plan_line(sections: tuple[str, ...], estimates: dict[str, float], quick: bool) -> str:
    """The first line: the sections in order and the whole run's estimate."""
    total = sum(estimates.values())
    hint = "" if quick else "; --quick runs the same sections shorter"
    return (f"bench: {len(sections)} section(s), {', '.join(sections)}: {about(total)} in all (estimate for an "
            f"idle 2-core CPU; several times longer on a busy machine{hint})")


def start_line(k: int, n: int, section: str, estimate: float) -> str:
    """Before section ``k`` of ``n``."""
    return f"[{k}/{n}] {section}: running, {about(estimate)} (estimate)"


def done_line(k: int, n: int, section: str, seconds: float) -> str:
    """After section ``k`` of ``n``, with the seconds it took."""
    return f"[{k}/{n}] {section}: done in {format_duration(seconds)}"
