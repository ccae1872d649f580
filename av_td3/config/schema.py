"""Typed configuration schemas: the single source of every config key, its default and its valid range.

Hydra composes ``conf/`` on top of these dataclasses (registered in the ConfigStore below), so a wrong type or
an unknown key fails at compose time. Ranges and cross-field rules are checked by
:func:`av_td3.config.checks.validate`, which names the full key and the fix. Every key here is read somewhere in
``av_td3``; ``tests/test_config_effects.py`` shows each one changing behaviour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and the fix."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           choices: tuple | None = None) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}


def rng(default: Any, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A dataclass field with a valid range (checked by :func:`validate`)."""
    return field(default=default, metadata=_range(lo, hi, **kw))


def one_of(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata=_range(choices=tuple(choices)))


# ----------------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    total_steps: int = rng(50_000, 1)
    learning_starts: int = rng(1_000, 0)
    eval_every: int = rng(5_000, 1)
    # 10 (5 before 2026-12-06): with the late-training mean (plan.metric) this brings the within-arm spread of the
    # default task's primary metric under 15% of its mean (docs/results/clip-study.md, 'The primary metric').
    eval_episodes: int = rng(10, 1)
    checkpoint_every: int = rng(5_000, 1)
    checkpoint_keep: int = rng(2, 1)
    # Save the replay buffer with each checkpoint, so a resumed run continues exactly.
    checkpoint_buffer: bool = True
    log_every: int = rng(1_000, 1)
    # Critic updates per environment step once learning has started (the replay ratio).
    updates_per_step: int = rng(1, 1)
    device: str = one_of("auto", "auto", "cpu", "cuda")
    # Checkpoint to resume from: "auto" (latest in this run's output dir, if any), "none", or a file path.
    resume: str = "auto"
    # Load a checkpoint that needs a full unpickle (format 1, written before 2026-12), which runs any code the
    # file names: only for a file you wrote yourself. Checkpoints are otherwise read as data (tensors, plain values).
    trust_checkpoint: bool = False
    # Threads torch may use; 0 keeps torch's default. Sweep launchers split cores between jobs with it.
    torch_threads: int = rng(0, 0)
    # Show a progress bar when attached to a terminal.
    progress: bool = True


# ------------------------------------------------------------------------------------------------------------- agent
@dataclass
class LrConfig:
    actor: float = rng(3e-4, 0, lo_open=True)
    critic: float = rng(3e-4, 0, lo_open=True)


@dataclass
class ClipConfig:
    """How each network's gradients are clipped; ``mode`` picks the strategy (see ``av_td3/agent/clipping.py``).
    ``actor``/``critic`` null: that network is not clipped, in every mode (``agc`` included)."""
    # Global-norm modes clip the net's L2 gradient norm over CNN + MLP together, to a limit that differs: norm: the
    # fixed limits below; adaptive: a percentile of the net's own recent norms (AutoClip, Seetharaman et al.
    # 2020); zscore: from an EMA mean and std of the net's norms, applied when a norm's z-score exceeds `z` (ZClip).
    # agc: per unit (Brock et al. 2021): each output row / conv filter (a bias or norm scale: the whole vector) has
    # its gradient norm clipped to `agc` x max(its weight norm, 1e-3); no global limit, so the fixed limits below
    # are unused except that null still turns a net's clipping off.
    mode: str = one_of("norm", "norm", "adaptive", "zscore", "agc")
    # The fixed limit (mode=norm), and in the adaptive modes the limit used until `warmup` norms have been seen.
    # Chosen at about the 90th percentile of each net's before-clip norm in an unclipped 50k-step run of this
    # default (results/pixels_lead, seed 0; docs/results/clip-study.md): actor p50/p90/p99 0.81/1.35/2.06,
    # critic 102/223/436, both growing over the run. So each limit binds on roughly one update in ten (actor ~7%,
    # critic ~13%; rarely early, up to a quarter near the end): it cuts the large steps and leaves the rest. The
    # limits before 2026-12-02 (actor 1, critic 10) clipped every critic update, i.e. normalised its gradient.
    # `av-td3 compare` prints norm percentiles and clip fraction per limit.
    actor: Optional[float] = rng(1.5, 0, lo_open=True)
    critic: Optional[float] = rng(200.0, 0, lo_open=True)
    # adaptive: the limit is this percentile (0-100) of the net's last `window` before-clip norms (this one included).
    percentile: float = rng(90.0, 0, 100, lo_open=True)
    window: int = rng(1000, 1)
    # zscore: a norm more than `z` std above the EMA mean (weight `ema` on the old value) is clipped; the EMAs are
    # fed the norms as clipped (as in the official ZClip code), skip zero norms, and start from the plain mean and
    # variance of the first `warmup` norms. The limit never falls below 1% of the fixed limit above.
    z: float = rng(2.5, 0, lo_open=True)
    ema: float = rng(0.97, 0, 1, lo_open=True, hi_open=True)
    # zscore: what a norm with z-score z > `z` is clipped to. adaptive (the official ZClip default): mean +
    # (z_thresh^2 / z) std, harder the further out; threshold (this project's rule until 2026-12-06, the runs in
    # results/): mean + z_thresh std.
    zscore_scaling: str = one_of("adaptive", "adaptive", "threshold")
    # adaptive and zscore: updates of a net before its own history sets the limit (zscore: non-zero norms).
    warmup: int = rng(25, 1)
    # agc: lambda, the largest ratio of a unit's gradient norm to its weight norm: DreamerV3's 0.3 (Brock et al.
    # used smaller values at large batch sizes, e.g. 0.01 at 4096).
    agc: float = rng(0.3, 0, lo_open=True)


@dataclass
class PidConfig:
    """Classical baseline: PID on speed + pure pursuit on the observation's lane-centre points."""
    target_speed: float = rng(5.0, 0, lo_open=True)
    kp: float = rng(0.5, 0)
    ki: float = rng(0.05, 0)
    kd: float = rng(0.0, 0)
    lookahead: float = rng(6.0, 0, lo_open=True)
    wheelbase: float = rng(2.5, 0, lo_open=True)
    max_steer_rad: float = rng(0.7854, 0, lo_open=True)


@dataclass
class AgentConfig:
    name: str = one_of("td3", "td3", "ddpg", "pid")
    lr: LrConfig = field(default_factory=LrConfig)
    # adam | sgd: the optimizer of both nets, at the learning rates `lr`. sgd (with `momentum`; unused with adam) is
    # the clipping study's positive control: without Adam's per-parameter normalisation a gradient's size is its
    # step's size, the case clipping is for (conf/stress/sgd.yaml).
    optimizer: str = one_of("adam", "adam", "sgd")
    momentum: float = rng(0.9, 0, 1, hi_open=True)
    clip: ClipConfig = field(default_factory=ClipConfig)
    policy_freq: int = rng(2, 1)
    tau: float = rng(0.005, 0, 1, lo_open=True)
    gamma: float = rng(0.99, 0, 1, hi_open=True)
    # Critic targets from n-step returns: up to n rewards summed (discounted) before bootstrapping; 1 = TD3's own.
    n_step: int = rng(1, 1, 100)
    policy_noise: float = rng(0.2, 0)
    noise_clip: float = rng(0.5, 0)
    exploration_noise: float = rng(0.1, 0)
    batch_size: int = rng(128, 1)
    buffer_size: int = rng(100_000, 1)
    # Twin critics (TD3) = 2; DDPG = 1.
    num_critics: int = rng(2, 1, 2)
    # separate: actor and critic each own a CNN; shared: one CNN trained by the critic, actor reads detached features.
    encoder: str = one_of("shared", "separate", "shared")
    features_dim: int = rng(64, 1)
    hidden_dim: int = rng(256, 1)
    hidden_layers: int = rng(2, 1)
    # Feed the lane-state vector to the networks next to the image features.
    use_state: bool = True
    # Image augmentation in the update only (never when acting or evaluating), see av_td3/agent/augment.py:
    # shift (DrQ's random shift: replicate-pad by augment_pad pixels, crop back at a random offset per sample) |
    # none (the default until 2026-12; docs/results/pixels.md compares the two).
    augment: str = one_of("shift", "none", "shift")
    augment_pad: int = rng(4, 0, 32)
    compile: bool = False
    # fp32 | bf16: bf16 runs the CNN encoder (the convolutions: most of an update's FLOP) under bfloat16 autocast,
    # forward and backward; the heads, losses, optimizer state and gradient norms stay float32. Opt-in: faster on
    # CPUs with AMX or AVX512-BF16 and GPUs with bf16 (av-td3 bench's update/default_bf16 row measures it here),
    # but the numbers differ from fp32 by bf16 rounding and its learning curves have not been shown equal.
    precision: str = one_of("fp32", "fp32", "bf16")
    # Gains of the classical baseline (used when agent.name=pid).
    pid: PidConfig = field(default_factory=PidConfig)


# --------------------------------------------------------------------------------------------------------------- env
@dataclass
class ImageConfig:
    # 64x64 keeps the default run within ~1-2 h on 2 CPU cores; env=carla's preset asks for 84x84.
    height: int = rng(64, 16, 512)
    width: int = rng(64, 16, 512)
    stack: int = rng(4, 1, 16)


@dataclass
class RewardConfig:
    """Weights of each reward component (see ``av_td3.envs.base.RewardFunction``)."""
    # efficiency: speed along the lane / target_speed, capped at 1.
    efficiency: float = 1.0
    target_speed: float = rng(10.0, 0, lo_open=True)
    # lane keeping: -(|lateral offset| / half lane width) - |heading error| / (pi/2).
    lane_keeping: float = 0.5
    # comfort: -|jerk| (m/s^3) / 10.
    comfort: float = 0.05
    # safety: -collision_penalty on collision, -offroad_penalty when leaving the road.
    collision_penalty: float = rng(10.0, 0)
    offroad_penalty: float = rng(10.0, 0)
    lane_invasion_penalty: float = rng(0.5, 0)
    # progress: metres travelled along the route this step.
    progress: float = 0.1
    # Episode rules (env=carla, av_td3/envs/carla/rules.py): each is its own reward term, -penalty on the step the
    # rule ends the episode, like collision_penalty and offroad_penalty in the safety term.
    route_deviation_penalty: float = rng(10.0, 0)
    wrong_way_penalty: float = rng(10.0, 0)
    blocked_penalty: float = rng(10.0, 0)
    red_light_penalty: float = rng(10.0, 0)


@dataclass
class CameraConfig:
    """CARLA RGB camera (converted to grayscale of env.image size)."""
    width: int = rng(84, 16, 2048)
    height: int = rng(84, 16, 2048)
    fov: float = rng(90.0, 10, 170)
    x: float = 1.5
    y: float = 0.0
    z: float = 2.4
    pitch: float = -15.0


@dataclass
class BevConfig:
    """The ego-centred, heading-up bird's-eye view (env.view=bev): metres of road the frame shows around the ego.
    Defaults: 48 m ahead, 16 m behind (the ego a quarter from the bottom), 16 m each side. 48 m ahead shows the
    lead vehicle almost as far as the state's lead range (50 m, av_td3.envs.base.LEAD_RANGE_M), ~5 s ahead on the
    racetrack; 16 m to each side keeps the racetrack's tight bends (15-30 m radius) and three highway lanes either
    side in view. At 64x64 a pixel is then 1 m along and 0.5 m across: a car is ~5 x 4 pixels, a lane 8-10 wide."""
    ahead_m: float = rng(48.0, 0, 500, lo_open=True)
    behind_m: float = rng(16.0, 0, 500)
    side_m: float = rng(16.0, 0, 500, lo_open=True)


@dataclass
class RouteConfig:
    """CARLA route built from the map's own waypoints."""
    length_m: float = rng(500.0, 10)
    spacing_m: float = rng(2.0, 0.5, 20)
    start_index: int = rng(-1, -1)  # -1: a seeded random spawn point


TM_PORT_OFFSET = 6000  # env.carla.tm_port=null: the server's port + this


@dataclass
class CarlaConfig:
    """The CARLA backend's own keys (``env.carla.*``, read by av_td3/envs/carla/ only)."""
    host: str = "localhost"
    port: int = rng(2000, 1, 65535)
    # Traffic Manager port: the trainer's worker process opens it, on every network interface of its machine (CARLA
    # binds it so). null: env.carla.port + TM_PORT_OFFSET (as CARLA-Roach does), so each job with its own server has
    # its own Traffic Manager port too (see traffic_manager_port).
    tm_port: Optional[int] = rng(None, 1, 65535)
    timeout_s: float = rng(10.0, 0.1)
    fixed_delta_s: float = rng(0.05, 0.001, 0.1)
    weather: str = "ClearNoon"
    max_reconnects: int = rng(3, 0)
    camera: CameraConfig = field(default_factory=CameraConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    # At start and after a reconnect: true loads env.town afresh (a clean world); false keeps the loaded map when
    # it is env.town and destroys every vehicle and sensor on it (faster, for a server only this run uses).
    load_world: bool = True
    # base_type of the NPC blueprints (car, van, truck, bus, motorcycle, bicycle), drawn per reset from the seed.
    npc_types: list[str] = field(default_factory=lambda: ["car"])
    # Seconds a step waits, after its frame's camera image and on-tick callback, for collision events of that
    # frame still in flight on their own stream (a later one counts at the next step).
    event_wait_s: float = rng(0.01, 0.0, 1.0)
    # Time-out of the first tick and camera frame of a new scene (start, reconnect): a cold server is slow.
    first_frame_timeout_s: float = rng(60.0, 0.1)
    # Minutes of worker restarts without a CARLA server before the run checkpoints and exits non-zero: when the
    # server is lost (after the in-place reconnects), the worker process is restarted (a fresh client and Traffic
    # Manager) with back-off for this long. The whole outage budget is longer: docs/carla.md says by how much.
    server_lost_minutes: float = rng(10.0, 0.0)
    # Episode rules after CARLA-Roach (av_td3/envs/carla/rules.py): each ends the episode as terminated and names
    # itself in info["termination"]; null (false) turns it off. Metres sideways off the route's lane centre;
    # degrees between the car's heading and the route's while moving; seconds standing still; running a red light.
    route_deviation_m: Optional[float] = rng(5.0, 0, lo_open=True)
    wrong_way_deg: Optional[float] = rng(135.0, 90, 180)
    blocked_s: Optional[float] = rng(60.0, 0, lo_open=True)
    red_light: bool = True
    # The traffic light ahead on the route in the state vector: metres to its stop line and its colour (red 1,
    # yellow 0.5, green 0), see av_td3/envs/carla/lights.py. false: they always read "no light" (50 m, 0), so the
    # state keeps its size and only the information is taken away, as env.lead_vehicle=false does for the lead car.
    traffic_light: bool = True

    def traffic_manager_port(self) -> int:
        """The Traffic Manager port this config uses: ``tm_port``, or ``port + TM_PORT_OFFSET`` when it is null."""
        return self.tm_port if self.tm_port is not None else self.port + TM_PORT_OFFSET


@dataclass
class EnvConfig:
    name: str = one_of("highway", "highway", "carla")
    town: str = "racetrack"
    npcs: int = rng(5, 0, 200)
    image: ImageConfig = field(default_factory=ImageConfig)
    max_episode_steps: int = rng(500, 1)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # What the image shows (embedded simulator only, see av_td3/envs/views.py; env=carla has its camera and warns
    # when this is changed): bev = ego-centred, heading-up bird's-eye view (env.bev.*) with its own gray level for
    # road, markings, the ego and other vehicles; world = highway-env's top view, world-aligned, 50 m wide, ego
    # centred (the default until 2026-12: its pixels barely show the traffic, docs/results/pixels.md).
    view: str = one_of("bev", "world", "bev")
    bev: BevConfig = field(default_factory=BevConfig)
    # Lane-centre points in the state vector (ego frame), spaced `lane_point_spacing` metres apart.
    lane_points: int = rng(5, 1, 32)
    lane_point_spacing: float = rng(4.0, 0.5)
    # Gap and closing speed to the nearest car ahead in the ego's lane in the state vector. false: they always
    # read "nobody ahead" (50 m, 0 m/s), so the state keeps its size and only the information is taken away.
    lead_vehicle: bool = True
    num_envs: int = rng(1, 1, 64)
    # Embedded simulator: physics steps per second and agent decisions per second.
    simulation_frequency: int = rng(15, 1, 120)
    policy_frequency: int = rng(5, 1, 60)
    # Which seeds the evaluation episodes use (eval episode i uses eval_seed + i).
    eval_seed: int = rng(10_000, 0)
    # The CARLA backend's own keys (env.carla.*); the embedded simulator warns when one is changed.
    carla: CarlaConfig = field(default_factory=CarlaConfig)


# ----------------------------------------------------------------------------------------------------------- monitor
@dataclass
class MonitorConfig:
    enabled: bool = True
    # clip_violation fires when an after-clip norm exceeds the limit used * (1 + tolerance).
    tolerance: float = rng(1e-4, 0)
    # Gradient spikes are judged against the net's own history, not a multiple of the clip limit: an update is a
    # spike when log(before-clip norm) exceeds the EMA mean of log norms by more than spike_z EMA std (so a large
    # but steady norm is not a spike). The EMA (weight spike_ema on the old value) starts after spike_warmup
    # updates of the net, and is fed the log norm capped at the threshold, so one spike does not hide the next.
    spike_z: float = rng(4.0, 0, lo_open=True)
    spike_ema: float = rng(0.99, 0, 1, lo_open=True, hi_open=True)
    spike_warmup: int = rng(100, 2)
    # grad_spike alerts when more than this share of an interval's updates are spikes. Every spike is counted
    # (grad/<net>/spikes); healthy default runs show 0-1% on the critic (measured at 50k steps), so 2% flags bursts.
    spike_alert_rate: float = rng(0.02, 0, 1)
    # q_divergence: |Q| or |actor loss| above q_margin * max|r| / (1 - gamma).
    q_margin: float = rng(2.0, 0, lo_open=True)
    # dead_gradient: a part's norm exactly 0 for this many consecutive updates of its net.
    dead_steps: int = rng(50, 1)
    # action_saturation: share of actions with |a| > saturation_level above saturation_threshold.
    saturation_level: float = rng(0.99, 0, 1, lo_open=True)
    saturation_threshold: float = rng(0.9, 0, 1)
    # skip: drop a non-finite update and count it; stop: checkpoint the last good state and exit non-zero.
    nan_policy: str = one_of("stop", "stop", "skip")
    # Verdict (av-td3 compare / validate): a run collapsed when its final level lost more than this share of what
    # its best level had gained over its first evaluation: best - final > collapse_fraction * (best - first).
    collapse_fraction: float = rng(0.5, 0, 1, lo_open=True)
    # A level is the mean of this many consecutive evaluations (final: the last ones; best: the best window), so
    # one noisy evaluation of trainer.eval_episodes episodes does not decide; 1 compares single evaluations.
    collapse_window: int = rng(2, 1)
    # Verdict: a run diverged when |Q| (or |actor loss|) passed q_return_factor x the largest |return| of any of
    # its episodes (training or evaluation): a Q value is a discounted return, so it cannot honestly exceed what
    # the run ever collected. Next to q_margin's reward bound, which only a Q far beyond any possible return hits.
    q_return_factor: float = rng(3.0, 1)
    # Verdict: a run failed to learn when its best level (collapse_window evaluations) never rose more than this
    # above the untrained agent's score (its random-action warm-up episodes' mean return), in return units: on the
    # default task random actions score about -4 and the PID baseline ~223; rescale it with the reward's weights.
    learn_min_gain: float = rng(50.0, 0)


# -------------------------------------------------------------------------------------------------------------- plan
@dataclass
class PlanConfig:
    """The declared analysis plan (``plan.*``): written in an experiment's config before its runs start, recorded
    in every run, and followed by ``av-td3 compare`` (which prints it and flags any departure from it) and
    ``av-td3 plan``. It never changes what a run computes. See av_td3/analysis/plan.py."""
    # The primary metric, per run (av_td3/analysis/metrics.py): late_return = mean evaluation return over the
    # evaluations in the last `late_fraction` of training; auc_return = mean over all evaluations; final_return =
    # the last evaluation only (a snapshot: the noisiest); late_success = mean success rate over the late evaluations.
    metric: str = one_of("late_return", "late_return", "auc_return", "final_return", "late_success")
    late_fraction: float = rng(0.5, 0, 1, lo_open=True)
    # The group every other group is compared with (a label as compare prints it, e.g. arm=td3_noclip); null: the
    # group clipping at the default limits, or compare's --baseline.
    baseline: Optional[str] = None
    # Smallest effect of interest, as a share of the baseline's mean primary metric (0.2 = 20%): the power
    # calculation's target, and the equivalence margin (+-) of an "equivalent" verdict.
    effect: float = rng(0.2, 0, lo_open=True)
    # Two-sided significance level of the whole family of comparisons with the baseline (Holm-adjusted).
    alpha: float = rng(0.05, 0, 0.5, lo_open=True)
    power: float = rng(0.8, 0, 1, lo_open=True, hi_open=True)
    # The seeds each group is planned to run (the sweep's seed list); empty: no plan for the number of runs.
    seeds: list[int] = field(default_factory=list)
    # Version of the verdict rules the plan was written for (av_td3/analysis/verdicts.py, RULES): compare flags
    # a report made with another version.
    rules: int = rng(5, 1)


# ------------------------------------------------------------------------------------------------------------ logger
@dataclass
class TensorboardConfig:
    flush_secs: int = rng(30, 1)
    # Observation frames written as images at each evaluation.
    eval_images: int = rng(4, 0)


@dataclass
class CsvConfig:
    filename: str = "scalars.csv"


@dataclass
class WandbConfig:
    project: str = "av-td3"
    mode: str = one_of("offline", "offline", "online", "disabled")
    entity: Optional[str] = None


@dataclass
class MlflowConfig:
    # null: a local SQLite store in the run's output dir.
    tracking_uri: Optional[str] = None
    experiment: str = "av-td3"


@dataclass
class LoggerConfig:
    """Each backend selected in ``logger=[...]`` fills its own key; unselected backends stay null (off)."""
    tensorboard: Optional[TensorboardConfig] = None
    csv: Optional[CsvConfig] = None
    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None


# ------------------------------------------------------------------------------------------------------------- root
@dataclass
class Config:
    seed: int = rng(0, 0)
    # Deterministic torch kernels (slower); makes interrupted + resumed runs reproduce uninterrupted ones.
    deterministic: bool = False
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Label of the experiment file in use (set by conf/experiment/*.yaml); names sweep dirs.
    experiment_name: Optional[str] = None


# Keys that moved (old dotted name -> new one): a section's rename covers the keys below it. The command line names
# the new key for an old one (launch.py) and archived runs' configs are read under the new names (av_td3.rundir).
RENAMED_KEYS: dict[str, str] = {f"env.{f.name}": f"env.carla.{f.name}" for f in dataclasses.fields(CarlaConfig)
                                if f.name != "traffic_light"}  # traffic_light came with env.carla


def renamed_key(key: str) -> str | None:
    """Today's name of ``key`` when it (or a section above it) is in :data:`RENAMED_KEYS`, else None."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` (whose defaults list starts with ``schema``) is typed."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


register_configs()
