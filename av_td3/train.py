"""The training loop: act, step, store, update, evaluate, log, checkpoint. Builds everything from the config.

Everything a run writes goes into ``run_dir`` (the Hydra output dir): ``tb/`` (TensorBoard), ``scalars.csv``,
``checkpoints/``, ``summary.json`` and ``train.log``. The x-axis of every scalar is the environment step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from av_td3 import bounds
from av_td3 import envs as envs_lib
from av_td3 import loggers
from av_td3.agent.monitor import NonFiniteError
from av_td3.agent.pid import PIDAgent
from av_td3.agent.td3 import TD3, Spec
from av_td3.checkpoint import CheckpointManager, check_compatible, load
from av_td3.config import Config, ConfigError, EnvConfig
from av_td3.envs.base import (ACTION_NAMES, REWARD_COMPONENTS, EnvUnavailableError, SimulatorLostError,
                              decision_dt, state_dim, state_scale)
from av_td3.progress import Progress
from av_td3.replay import ReplayBuffer
from av_td3.rundir import DIVERGENCE_ALERTS, Summary, write_summary
from av_td3.sweep import FAILED_OBJECTIVE
from av_td3.timing import NO_PHASES, NoPhases

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    def __init__(self, signum: int, what: str = "interrupted by") -> None:
        super().__init__(f"{what} {signal.Signals(signum).name}")
        self.signum = signum


class Preempted(Interrupted):
    """A cluster launcher announced preemption or the end of the job's time slot. The trainer checkpoints; then
    ``requeue(signum, None)``, the launcher's own handler (submitit's), requeues the job, which resumes."""

    def __init__(self, signum: int, requeue: Callable[[int, Any], Any]) -> None:
        super().__init__(signum, "preempted: the cluster launcher sent")
        self.requeue = requeue


def preemption_signal() -> signal.Signals:
    """The signal submitit jobs receive before preemption or their time limit: USR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` names another."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available: use trainer.device=auto or cpu.")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def provenance() -> dict[str, str]:
    """Git commit and package versions, recorded with every run."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "host": platform.node()}
    for pkg in ("av-td3", "torch", "numpy", "gymnasium", "highway-env", "hydra-core"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def flat_hparams(cfg: Config) -> dict[str, float | int | str | bool]:
    """The hyper-parameters runs are compared by (TensorBoard HParams tab); null clip → "off"."""
    a, e = cfg.agent, cfg.env
    return {"seed": cfg.seed, "agent": a.name, "encoder": a.encoder, "clip_actor": a.clip.actor or "off",
            "clip_critic": a.clip.critic or "off", "lr_actor": a.lr.actor, "lr_critic": a.lr.critic,
            "policy_freq": a.policy_freq, "tau": a.tau, "gamma": a.gamma, "n_step": a.n_step,
            "batch_size": a.batch_size, "town": e.town, "npcs": e.npcs, "total_steps": cfg.trainer.total_steps}


def agent_spec(e: EnvConfig) -> Spec:
    """The shapes the agent is built for, from the env config (also used by ``av-td3 bench``)."""
    return Spec(stack=e.image.stack, height=e.image.height, width=e.image.width, state_dim=state_dim(e.lane_points),
                action_dim=len(ACTION_NAMES), state_scale=state_scale(e.lane_points, e.lane_point_spacing),
                action_names=ACTION_NAMES)


def crossed(prev: int, now: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (prev, now] (steps advance by num_envs)."""
    return now // every > prev // every


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        t, a, e = cfg.trainer, cfg.agent, cfg.env
        if t.torch_threads > 0:
            torch.set_num_threads(t.torch_threads)
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = resolve_device(t.device)
        self.rng = np.random.default_rng(cfg.seed)
        self.n = e.num_envs
        self.spec = agent_spec(e)
        self.reward_bound = bounds.max_abs_reward(cfg)
        self.q_bound = bounds.q_bound(cfg)

        self.summary = Summary(total_steps=t.total_steps)
        self.ckpt = CheckpointManager(run_dir / "checkpoints", t.checkpoint_keep)
        # A CARLA server runs one synchronous world: evaluation must use the training env's connection (and
        # restarts the training episode afterwards); the embedded simulator gets a separate eval instance.
        self.eval_shares_env = e.name == "carla"
        if self.eval_shares_env and self.n > 1:
            raise ConfigError(f"env.num_envs={self.n} with env=carla: one CARLA server runs one env. Use "
                              "env.num_envs=1 and run several jobs, one server each (see README).")
        # The envs before the replay buffer and the networks: a bad env.town or an unreachable server fails in
        # seconds, before memory is allocated.
        self.envs = envs_lib.make_vector(e, self.n)
        try:
            self.eval_env = self.envs.envs[0] if self.eval_shares_env else envs_lib.make(e)
            self._build_agent()
        except BaseException:
            self.envs.close()  # a CARLA env restores the server's settings on close
            raise
        self.step = 0
        self.episodes = 0
        self.reconnects = 0
        self.resumed_from: Path | None = None
        self._maybe_resume()
        self.logger = loggers.make(cfg.logger, run_dir, purge_step=self.step if self.resumed_from else None)
        self._stop_signal: int | None = None
        self._launcher_handler: Any = None
        self._last_return = float("nan")  # of the newest finished training episode, for progress reports
        self._flushed_step = self.step  # the step of the monitor's last flush into the logs
        self.phases: NoPhases = NO_PHASES  # av-td3 bench's per-phase timer (see time_phases); no-ops otherwise

    def time_phases(self, timer: NoPhases) -> None:
        """Charge each phase of the loop and of the agent's update to ``timer`` (``av-td3 bench``)."""
        self.phases = timer
        if self.learning:
            self.agent.phases = timer

    def _build_agent(self) -> None:
        cfg, a, e = self.cfg, self.cfg.agent, self.cfg.env
        # agent=pid drives with a fixed controller: no replay buffer, no updates, same loop otherwise.
        self.learning = a.name != "pid"
        self.agent: TD3 | PIDAgent
        if self.learning:
            bpr = ReplayBuffer.bytes_per_row(
                (e.image.height, e.image.width), self.spec.state_dim, self.spec.action_dim)
            self.buffer = ReplayBuffer(a.buffer_size, (e.image.height, e.image.width), e.image.stack,
                                       self.spec.state_dim, self.spec.action_dim, num_envs=self.n, seed=cfg.seed,
                                       device=self.device)
            log.info("replay buffer: %d transitions, %d bytes per transition (%.1f MB allocated)",
                     a.buffer_size, bpr, self.buffer.nbytes / 1e6)
            self.agent = TD3(a, cfg.monitor, self.spec, self.device, self.q_bound, seed=cfg.seed)
            for net, parts in self.agent.parts().items():
                for part, names in parts.items():
                    log.info("%s optimizer owns %s params: %s", net, part, ", ".join(names) if names else "(none)")
        else:
            self.agent = PIDAgent(a.pid, e.lane_points, decision_dt(e), self.n)
            log.info("agent=pid: PID speed control (target %.1f m/s) + pure pursuit; nothing is learned",
                     a.pid.target_speed)

    # ------------------------------------------------------------------------------------------------ resume
    def _compat(self) -> dict[str, Any]:
        a, e = self.cfg.agent, self.cfg.env
        return {"image": [e.image.stack, e.image.height, e.image.width], "state_dim": self.spec.state_dim,
                "encoder": a.encoder, "features_dim": a.features_dim, "hidden_dim": a.hidden_dim,
                "hidden_layers": a.hidden_layers, "num_critics": a.num_critics, "use_state": a.use_state,
                "num_envs": e.num_envs}

    def _maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return
        trust = self.cfg.trainer.trust_checkpoint
        # Read onto the CPU: the RNG states must be CPU tensors, the buffer is numpy, and the agent and its
        # optimizers move what they load onto their own device.
        if resume == "auto":
            found = self.ckpt.load_latest("cpu", trust)
            if found is None:
                return
            state, path = found
        else:
            path = Path(resume)
            if path.name == "latest":
                path = path.parent / path.read_text().strip()
            if not path.exists():
                raise ConfigError(f"trainer.resume={resume}: no such checkpoint file. Give an existing .pt path, "
                                  "or trainer.resume=auto.")
            state = load(path, "cpu", trust)
        check_compatible(state["compat"], self._compat(), path)
        self.agent.load_state_dict(state["agent"])
        if "buffer" in state and self.learning:
            try:
                self.buffer.load_state_dict(state["buffer"])
            except ValueError as e:
                raise ConfigError(f"checkpoint {path}: {e}. Resume with the configuration it was made with, or "
                                  "start fresh with trainer.resume=none in a new output dir.") from e
        self.step, self.episodes = state["step"], state["episodes"]
        self.rng.bit_generator.state = state["rng"]["trainer"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        self.summary.wall_s = state.get("wall_s", 0.0)
        # a run resumed at its last step trains no further: its final evaluation comes from the checkpoint
        self.summary.final_eval = state.get("final_eval")
        self.resumed_from = path
        log.info("resumed from %s at env step %d (episode %d)", path, self.step, self.episodes)

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "episodes": self.episodes, "agent": self.agent.state_dict(),
                 "final_eval": self.summary.final_eval,
                 "compat": self._compat(), "wall_s": self.summary.wall_s,
                 "rng": {"trainer": self.rng.bit_generator.state, "python": random.getstate(),
                         "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
        if self.cfg.trainer.checkpoint_buffer and self.learning:
            state["buffer"] = self.buffer.state_dict()
        path = self.ckpt.save(state, self.step)
        log.info("checkpoint written: %s", path)
        return path

    # ------------------------------------------------------------------------------------------- self-checks
    def self_check(self) -> None:
        """Stop before training on a black or frozen camera, or on observations the networks don't expect."""
        probe = self.eval_env
        o, _ = probe.reset(seed=self.cfg.env.eval_seed)
        for key, want in self.envs.single_observation_space.items():
            got = o[key]
            if got.dtype != want.dtype or got.shape != want.shape:
                raise EnvUnavailableError(f"observation '{key}' is {got.dtype}{list(got.shape)} but the "
                                          f"networks expect {want.dtype}{list(want.shape)}: the env backend "
                                          "breaks the contract in av_td3/envs/base.py.")
        first = o["image"][-1]
        if first.min() == first.max():
            raise EnvUnavailableError(
                f"the camera image is constant (every pixel = {first.min()}): the simulator is not drawing. With "
                "the embedded simulator check SDL_VIDEODRIVER (it must not be 'dummy'; av-td3 uses 'offscreen').")
        frames = [first]
        for _ in range(5):
            o, _, term, trunc, _ = probe.step(np.array([0.0, 0.5], dtype=np.float32))
            frames.append(o["image"][-1])
            if term or trunc:
                break
        if all(np.array_equal(frames[0], f) for f in frames[1:]):
            raise EnvUnavailableError("the camera image did not change over 5 steps of driving: the simulator's "
                                      "frames are frozen.")

    # ----------------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        """Deterministic policy on a separate env instance with fixed seeds (eval_seed + i): comparable across
        runs and configurations, and the training episode in progress is not disturbed."""
        e = self.cfg.env
        returns, successes, collisions, invasions = [], [], [], []
        frames = []
        for i in range(self.cfg.trainer.eval_episodes):
            obs, _ = self.eval_env.reset(seed=e.eval_seed + i)
            policy = self.agent.for_evaluation()
            ret, n_col, n_inv, done = 0.0, 0, 0, False
            while not done:
                batch = {k: v[None] for k, v in obs.items()}
                action = policy.check_action(policy.act(batch, noise=0.0)[0], self.step)
                obs, r, term, trunc, info = self.eval_env.step(action)
                ret += r
                n_col += int(info["collision"])
                n_inv += int(info["lane_invasion"])
                if i == 0 and len(frames) < 16:
                    frames.append(obs["image"][-1])
                done = term or trunc
            returns.append(ret)
            successes.append(float(trunc and not term))  # reached the step limit without crashing or leaving
            collisions.append(n_col)
            invasions.append(n_inv)
        if frames:
            self.logger.log_images("eval/observation", np.stack(frames[:: max(1, len(frames) // 4)]), self.step)
        return {"eval/return": float(np.mean(returns)), "eval/success_rate": float(np.mean(successes)),
                "eval/collisions": float(np.mean(collisions)), "eval/lane_invasions": float(np.mean(invasions))}

    # ---------------------------------------------------------------------------------------------------- run
    def _write_summary(self) -> None:
        write_summary(self.run_dir, self.summary)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum  # handled between steps, where the state is consistent

    def train(self) -> Summary:
        cfg, t, a = self.cfg, self.cfg.trainer, self.cfg.agent
        self.summary.provenance = provenance()
        self._write_summary()
        self.logger.log_run_info(OmegaConf.to_container(OmegaConf.structured(cfg)), flat_hparams(cfg),
                                 {"seed": str(cfg.seed), **self.summary.provenance})
        stop_signals = [signal.SIGINT, signal.SIGTERM]
        # In a submitit job (launcher=slurm) the launcher's handler for the preemption signal requeues the job
        # at once; take the signal first, checkpoint, then hand it on (see Preempted), so the requeued job
        # resumes from where this one stopped instead of from the last periodic checkpoint.
        preempt = preemption_signal()
        self._launcher_handler = signal.getsignal(preempt)
        if callable(self._launcher_handler):
            stop_signals.append(preempt)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in stop_signals}
        start = time.perf_counter()
        wall0 = self.summary.wall_s
        try:
            self._loop()
            self.summary.status = "completed"
        except NonFiniteError as err:
            self.summary.status, self.summary.reason = "stopped", str(err)
            self.summary.nan_guard = {"triggered": True, "quantity": err.quantity, "step": err.step}
            self.save_checkpoint()  # the weights are still the last good ones: the guard acted before the step
            self._flush_metrics()
            log.error("NaN guard (monitor.nan_policy=stop): %s. The last good state is checkpointed in %s; lower "
                      "the learning rates or enable clipping, or use monitor.nan_policy=skip.", err, self.ckpt.dir)
            raise
        except Interrupted as err:
            self.summary.status, self.summary.reason = "stopped", str(err)
            self.save_checkpoint()
            self._flush_metrics()
            if isinstance(err, Preempted):
                log.warning("%s at env step %d: checkpoint written; the job is requeued and resumes from it.",
                            err, self.step)
            else:
                log.warning("%s at env step %d: checkpoint written.", err, self.step)
            raise
        except SimulatorLostError as err:
            self.summary.status, self.summary.reason = "stopped", f"simulator lost: {err}"
            self.save_checkpoint()
            self._flush_metrics()
            log.error("%s — checkpoint written.", err)
            raise
        except BaseException as err:
            self.summary.status, self.summary.reason = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.summary.steps = self.step
            self.summary.wall_s = wall0 + time.perf_counter() - start
            monitor = self.agent.monitor if self.learning else None
            self.summary.alerts = dict(monitor.alert_counts) if monitor else {}
            self.summary.divergence_alerts = sum(v for k, v in self.summary.alerts.items()
                                                 if k.split("/")[1] in DIVERGENCE_ALERTS)
            self.summary.skipped_updates = monitor.skipped_updates if monitor else 0
            self.summary.objective = self.objective()
            self._write_summary()
            if self.summary.final_eval is not None:
                self.logger.log_final(flat_hparams(cfg), self.summary.final_eval)
            self.logger.close()
            self.envs.close()
            if not self.eval_shares_env:
                self.eval_env.close()
        return self.summary

    def objective(self) -> float:
        """Final evaluation return for sweepers; a finite penalty (the worst possible return) when the run had no
        final evaluation, or was stopped by the NaN guard — whose last evaluation predates the divergence, so a
        search would otherwise favour configs that diverge after a good start. (A NaN objective crashes Optuna.)"""
        fe = self.summary.final_eval
        if fe is not None and math.isfinite(fe["return"]) and not self.summary.nan_guard["triggered"]:
            return fe["return"]
        return -self.reward_bound * self.cfg.env.max_episode_steps

    def _episode_seed(self) -> int:
        """Training episodes get explicit seeds, so a resumed run replays the same episodes."""
        self.episodes += 1
        return self.cfg.seed * 1_000_003 + self.episodes

    def _loop(self) -> None:
        cfg, t, a = self.cfg, self.cfg.trainer, self.cfg.agent
        n = self.n
        if self.step == 0:
            self.self_check()
        obs, _ = self.envs.reset(seed=[self._episode_seed() for _ in range(n)])
        if self.learning:
            self.buffer.start_episode(obs)
        self.agent.reset(np.arange(n))
        ep_return = np.zeros(n)
        ep_len = np.zeros(n, dtype=int)
        ep_col = np.zeros(n)
        ep_inv = np.zeros(n)
        ep_comp = {c: np.zeros(n) for c in REWARD_COMPONENTS}
        interval_start, interval_step = time.perf_counter(), self.step
        pending_ckpt = False
        bar = self._progress()

        while self.step < t.total_steps:
            self.phases.begin_step(self.step)
            if self._stop_signal is not None:
                if self._stop_signal == preemption_signal():  # only taken when a launcher handles it
                    raise Preempted(self._stop_signal, self._launcher_handler)
                raise Interrupted(self._stop_signal)
            if self.learning and self.step < t.learning_starts:
                action = self.rng.uniform(-1.0, 1.0, size=(n, self.spec.action_dim)).astype(np.float32)
            else:
                action = self.agent.check_action(self.agent.act(obs, noise=a.exploration_noise), self.step)
            self.phases.lap("act")
            next_obs, reward, term, trunc, info = self.envs.step(action)
            self.phases.lap("env_step")
            prev_step, self.step = self.step, self.step + n
            bar.update(self.step, warmup=self.learning and prev_step < t.learning_starts)

            if "reconnects" in info:  # CARLA: cumulative reconnects to the server after time-outs
                self.reconnects = int(np.max(info["reconnects"]))
            ep_return += reward
            ep_len += 1
            ep_col += info["collision"]
            ep_inv += info["lane_invasion"]
            for c in REWARD_COMPONENTS:
                ep_comp[c] += info["reward_components"][c]
            if self.learning:
                self.buffer.add(action, reward, next_obs, term, trunc)
            self.phases.lap("store")

            ended = term | trunc
            if ended.any():
                for i in np.flatnonzero(ended):
                    ep_scalars = {"episode/return": ep_return[i], "episode/length": ep_len[i],
                                  "episode/collisions": ep_col[i], "episode/lane_invasions": ep_inv[i],
                                  **{f"episode/reward_{c}": ep_comp[c][i] for c in REWARD_COMPONENTS}}
                    self.logger.log_scalars(ep_scalars, self.step)
                    self._last_return = ep_return[i]
                    for arr in (ep_return, ep_len, ep_col, ep_inv, *ep_comp.values()):
                        arr[i] = 0
            self.phases.lap("log")

            # updates begin with the first policy step: (total_steps - learning_starts) x updates_per_step in all
            if self.learning and prev_step >= t.learning_starts and len(self.buffer) >= a.batch_size:
                for _ in range(t.updates_per_step * n):
                    batch = self.buffer.sample(a.batch_size, a.n_step, a.gamma)
                    self.phases.lap("sample")
                    self.agent.update(batch, self.step)  # laps critic, monitor, actor, target

            if crossed(prev_step, self.step, t.log_every) or self.step >= t.total_steps:
                now = time.perf_counter()
                learned = self.learning and self.agent.critic_updates > 0
                scalars = self.agent.monitor.flush(self.step).scalars if learned else {}
                scalars["perf/steps_per_s"] = (self.step - interval_step) / max(now - interval_start, 1e-9)
                if self.eval_shares_env:
                    scalars["env/reconnects"] = float(self.reconnects)
                self.logger.log_scalars(scalars, self.step)
                interval_start, interval_step = now, self.step
                self._flushed_step = self.step
                self._report(bar, scalars)
            self.phases.lap("log")
            evaluated = crossed(prev_step, self.step, t.eval_every) or self.step >= t.total_steps
            if evaluated:
                ev = self.evaluate()
                self.logger.log_scalars(ev, self.step)
                self.summary.final_eval = {k.removeprefix("eval/"): v for k, v in ev.items()}
                log.info("eval at step %d: return %.2f, success %.0f%%", self.step, ev["eval/return"],
                         100 * ev["eval/success_rate"])
            if crossed(prev_step, self.step, t.checkpoint_every):
                pending_ckpt = True
            # A single env checkpoints at the next episode end, so a resumed run replays identical episodes.
            if (pending_ckpt and (n > 1 or ended.all())) or self.step >= t.total_steps:
                self.summary.steps = self.step
                self.save_checkpoint()
                pending_ckpt = False
            self.phases.lap("eval_checkpoint")

            if evaluated and self.eval_shares_env:  # the evaluation took over the training env: start afresh
                ended[:] = True
                for arr in (ep_return, ep_len, ep_col, ep_inv, *ep_comp.values()):
                    arr[:] = 0
            # Ended episodes restart after the checkpoint, so a resumed run starts them with the same seeds.
            if ended.any() and self.step < t.total_steps:
                seeds = [self._episode_seed() if e else None for e in ended]
                next_obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": ended})
                if self.learning:
                    self.buffer.start_episode({k: v[ended] for k, v in next_obs.items()},
                                              env_ids=np.flatnonzero(ended))
                self.agent.reset(np.flatnonzero(ended))
            obs = next_obs
            self.phases.lap("env_reset")
        bar.close()

    # ----------------------------------------------------------------------------------------------- progress
    def _progress(self) -> Progress:
        """A bar when on a terminal (and trainer.progress), else a progress line every 30 s; both with an ETA."""
        t = self.cfg.trainer
        return Progress(t.total_steps, self.step, t.learning_starts, bar=t.progress and sys.stderr.isatty())

    def _report(self, bar: Progress, scalars: dict[str, float]) -> None:
        alerts = sum(self.agent.monitor.alert_counts.values()) if self.learning else 0
        bar.set_stats(f"last episode return {self._last_return:.1f} | {scalars['perf/steps_per_s']:.1f} steps/s | "
                      f"alerts {alerts}")

    def _flush_metrics(self) -> None:
        """At a stop (signal, NaN guard, simulator lost): log what the monitor gathered since the last log, so
        `av-td3 validate` judges the run on every update it made. Called after the checkpoint, which keeps the
        unflushed interval: a resumed run logs it at its next interval, and these points (at the stop step) are
        purged on resume."""
        if not self.learning or self.agent.critic_updates == 0 or self._flushed_step == self.step:
            return
        try:
            self.logger.log_scalars(self.agent.monitor.flush(self.step).scalars, self.step)
            self._flushed_step = self.step
        except Exception:  # the stop's own reason matters more than these points
            log.exception("could not log the metrics gathered since the last log interval")


def run(cfg: Config, run_dir: Path) -> Summary:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"the output dir {run_dir} is not writable: choose another with hydra.run.dir=PATH.")
    try:
        trainer = Trainer(cfg, run_dir)
    except BaseException as err:
        # .hydra/config.yaml already describes this attempt: an earlier attempt's summary must not pass for it.
        failed = Summary(status="failed", reason=f"{type(err).__name__}: {err}", total_steps=cfg.trainer.total_steps,
                         objective=FAILED_OBJECTIVE)
        with contextlib.suppress(OSError):
            write_summary(run_dir, failed)
        raise
    return trainer.train()

