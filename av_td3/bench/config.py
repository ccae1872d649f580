"""What the bench measures and at which sizes: :class:`BenchConfig`, its presets, and the training
:class:`av_td3.config.Config` each kind of row is built from.

Two kinds of rows, one way of building them: the headline (``default``) rows read ``conf/`` composed by Hydra as
``launch.py`` composes it (:func:`default_config`); the older rows keep the fixed sizes of ``BenchConfig.height``
... ``batch_size``, written as an env and agent config of those sizes (:func:`fixed_config`). Either config then
goes through the trainer's own builders (its Spec from :func:`av_td3.train.agent_spec`, its Q bound from
:mod:`av_td3.bounds`), so a row measures what training would build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: `av-td3 bench --only replay` composes no config
    from av_td3.config import Config, EnvConfig


@dataclass
class BenchConfig:
    """What is measured and how long. :func:`preset` gives the default (full) and ``--quick`` settings."""
    device: str = "cpu"
    threads: int = 0                 # torch intra-op threads; 0 keeps torch's default
    seed: int = 0
    # the headline ("default") rows: conf/ composed by Hydra with these overrides (e.g. "agent.batch_size=64")
    overrides: tuple[str, ...] = ()
    matmul_size: int = 2048          # the float32 matmul (n x n @ n x n) whose rate the update rows are held to
    # shapes and sizes of the secondary rows (ours and SB3's alike)
    height: int = 84
    width: int = 84
    stack: int = 4
    batch_size: int = 64
    features_dim: int = 64
    hidden_dim: int = 256
    hidden_layers: int = 2
    lane_points: int = 5             # our state vector: 5 + 2 * lane_points floats
    # update rows
    update_reps: int = 9
    updates_per_rep: int = 40
    warmup_updates: int = 4
    fill: int = 1000                 # random transitions in each replay buffer the updates sample from
    update_rows: tuple[str, ...] = ("default", "default_bf16", "default_monitor_off", "ours_separate",
                                    "ours_separate_monitor_off", "ours_shared", "ours_shared_monitor_off",
                                    "ours_separate_compile", "sb3")
    # replay rows
    replay_capacity: int = 2000
    # env rows
    npcs: int = 20
    env_reps: int = 5
    env_steps_per_rep: int = 400
    # end-to-end rows (the default rows start learning at max(e2e_learning_starts, batch size), rounded up to a
    # multiple of e2e_log_every, and learn for as many steps as the fixed-size rows)
    e2e_total_steps: int = 1000
    e2e_learning_starts: int = 200
    e2e_log_every: int = 100
    e2e_max_episode_steps: int = 200
    e2e_encoder: str = "separate"
    e2e_num_envs: tuple[int, ...] = (1, 2)  # one run each: env.num_envs=1, and simulators in worker processes
    # checkpoint rows: a trainer at the default configuration, its replay buffer full (checkpoint_buffer_size rows;
    # None: the configuration's agent.buffer_size) of checkpoint_env_steps rendered env steps, cycled
    checkpoint_buffer_size: int | None = None
    checkpoint_env_steps: int = 200
    checkpoint_reps: int = 3
    # regression rows (section "regression", only with a ref): today's code vs the commit `against` resolves to,
    # each in real training runs of regression_total_steps env steps launched by its own launch.py, learning from
    # regression_learning_starts, logged every regression_log_every; regression_pairs pairs interleaved A B B A ...
    # at each trainer.torch_threads of regression_threads (0: torch's default). Each code at its own shipped
    # default, plus against_overrides (both codes) and today_overrides (today's code only, e.g. the earlier
    # default's settings where today's default differs)
    against: str | None = None
    against_overrides: tuple[str, ...] = ()
    today_overrides: tuple[str, ...] = ()
    regression_total_steps: int = 2000
    regression_learning_starts: int = 1000
    regression_log_every: int = 100
    regression_pairs: int = 2
    regression_threads: tuple[int, ...] = (1, 0)
    # busy rows (section "busy", only when asked for): today's default at torch's default threads and at one,
    # busy_pairs pairs of runs of the regression rows' sizes, next to two busy-looping processes
    busy_pairs: int = 2
    sections: tuple[str, ...] = ("update", "replay", "env", "e2e", "checkpoint")


# Every section, in the order run_bench runs them; "regression" (it needs a ref) and "busy" (it loads the machine
# on purpose) run only when asked for.
ALL_SECTIONS = ("regression", "busy", "update", "replay", "env", "e2e", "checkpoint")


def preset(quick: bool) -> BenchConfig:
    """The full bench (``quick=False``) or ``--quick``: fewer repetitions and shorter runs, the same shapes."""
    if not quick:
        return BenchConfig()
    # ~2 minutes on a 2-core CPU
    return BenchConfig(update_reps=5, updates_per_rep=12, warmup_updates=2, fill=300, env_reps=3,
                       update_rows=("default", "default_bf16", "ours_separate", "ours_separate_monitor_off",
                                    "ours_shared", "sb3"),
                       env_steps_per_rep=150, e2e_total_steps=120, e2e_learning_starts=40, e2e_log_every=40,
                       e2e_max_episode_steps=100, e2e_num_envs=(1,), checkpoint_reps=2,
                       regression_total_steps=300, regression_learning_starts=150, regression_log_every=50)


# ---------------------------------------------------------------------------------------------- the default rows
def default_config(overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The shipped default :class:`av_td3.config.Config`: ``conf/`` composed by Hydra (as ``launch.py`` does) with
    ``overrides`` (``key=value`` strings, as on the training command line), validated."""
    from hydra import compose, initialize_config_dir

    from av_td3.config import to_config

    conf_dir = Path(__file__).resolve().parent.parent / "conf"  # shipped inside the package (a link in a checkout)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def default_sizes(conf: Config) -> dict[str, Any]:
    """What the default rows measure, for their notes and ``bench.json``."""
    a, e = conf.agent, conf.env
    return {"stack": e.image.stack, "height": e.image.height, "width": e.image.width, "batch_size": a.batch_size,
            "encoder": a.encoder, "features_dim": a.features_dim, "hidden_dim": a.hidden_dim,
            "hidden_layers": a.hidden_layers, "policy_freq": a.policy_freq, "monitor": conf.monitor.enabled,
            "npcs": e.npcs, "num_envs": e.num_envs, "updates_per_step": conf.trainer.updates_per_step}


def describe_default(conf: Config, monitor: bool = True) -> str:
    """The default configuration's sizes in words (``monitor``: say whether the monitor is on)."""
    d = default_sizes(conf)
    return (f"default config: {d['stack']}x{d['height']}x{d['width']} frames, batch {d['batch_size']}, "
            f"agent.encoder={d['encoder']}, features {d['features_dim']}, hidden {d['hidden_layers']}x"
            f"{d['hidden_dim']}" + (f", monitor {'on' if d['monitor'] else 'off'}" if monitor else ""))


# ------------------------------------------------------------------------------------------- the fixed-size rows
def fixed_env_config(cfg: BenchConfig, **kw: Any) -> EnvConfig:
    """The embedded simulator at the fixed sizes: ``cfg.npcs`` NPCs, ``cfg.stack`` x ``cfg.height`` x
    ``cfg.width`` frames, ``cfg.lane_points`` lane points, ``env.view=world`` (the view these rows have always
    measured; ``env/steps_per_s_bev`` asks for bev); ``kw`` sets further :class:`EnvConfig` fields."""
    from av_td3.config import EnvConfig, ImageConfig

    kw = {"view": "world", **kw}
    return EnvConfig(npcs=cfg.npcs, image=ImageConfig(height=cfg.height, width=cfg.width, stack=cfg.stack),
                     lane_points=cfg.lane_points, **kw)


def fixed_config(cfg: BenchConfig, encoder: str = "separate", monitor: bool = True, compile: bool = False,
                 buffer_size: int | None = None, **env_kw: Any) -> Config:
    """A validated training config at the fixed sizes of ``cfg`` (batch, features, hidden layers; the env of
    :func:`fixed_env_config` with ``env_kw``), no image augmentation (SB3, which these rows are held against, has
    none), the CSV logger, everything else at the schema's defaults.
    ``buffer_size`` defaults to the bench's ``fill`` plus a little: the update rows never store more."""
    from av_td3.config import AgentConfig, Config, CsvConfig, LoggerConfig, MonitorConfig, to_config

    agent = AgentConfig(batch_size=cfg.batch_size, encoder=encoder, features_dim=cfg.features_dim,
                        hidden_dim=cfg.hidden_dim, hidden_layers=cfg.hidden_layers, compile=compile, augment="none",
                        buffer_size=cfg.fill + 10 if buffer_size is None else buffer_size)
    return to_config(Config(seed=cfg.seed, agent=agent, env=fixed_env_config(cfg, **env_kw),
                            monitor=MonitorConfig(enabled=monitor), logger=LoggerConfig(csv=CsvConfig())))


def bench_trainer(conf: Config, cfg: BenchConfig, **trainer: Any) -> Config:
    """``conf`` as a trainer the bench runs: a fresh run (no resume) on the bench's device and torch threads, no
    progress bar, CSV logging only, the ``trainer`` keys given set as well. Validated."""
    import torch

    from av_td3.config import CsvConfig, LoggerConfig, to_config

    conf.trainer = dataclasses.replace(conf.trainer, device=str(cfg.device), resume="none",
                                       torch_threads=torch.get_num_threads(), progress=False, **trainer)
    conf.logger = LoggerConfig(csv=CsvConfig())
    return to_config(conf)
