"""The training loop: act, step, store, update, log, evaluate, checkpoint — :meth:`Trainer._loop`, top to bottom.

Everything a run writes goes into ``run_dir`` (the Hydra output dir): ``tb/`` (TensorBoard), ``scalars.csv``,
``checkpoints/``, ``summary.json`` and ``train.log``. The x-axis of every scalar is the environment step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from omegaconf import OmegaConf

from av_td3 import bounds, loggers, machine
from av_td3.agent.monitor import NonFiniteError
from av_td3.checkpoint import CheckpointManager, plain
from av_td3.config import Config, ConfigError
from av_td3.envs import backend
from av_td3.envs.base import SimulatorLostError, SimulatorUnusableError, StopRequested
from av_td3.progress import Progress
from av_td3.rundir import CHECKPOINT_DIR, COMPLETED, FAILED, STOPPED, Summary, write_summary
from av_td3.timing import NO_PHASES, NoPhases, UpdatePhases
from av_td3.train import evaluation, resume, summary
from av_td3.train.build import (agent_spec, check_env, eval_shares_env, make_agent, make_envs, resolve_device,
                                seed_everything)
from av_td3.train.episodes import Episodes
from av_td3.train.signals import Interrupted, Preempted, StopSignals

log = logging.getLogger("av_td3.train")  # the trainer's log lines carry one name, whichever module writes them


def crossed(prev: int, now: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (prev, now] (steps advance by num_envs)."""
    return now // every > prev // every


class Trainer:
    """One run: :meth:`__init__` builds everything from ``cfg`` (resuming from a checkpoint when asked),
    :meth:`train` trains it. The trainer owns the counters: ``step`` (env steps, all envs together) and
    ``episodes`` (training episodes started)."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        t, e = cfg.trainer, cfg.env
        if t.torch_threads > 0:
            torch.set_num_threads(t.torch_threads)
        busy = machine.busy_note(torch.get_num_threads()) if torch.get_num_threads() > 1 else None
        if busy is not None:  # one thread never waits for another: spinning only costs multi-threaded runs
            log.warning(busy)
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = resolve_device(t.device)
        self.rng = np.random.default_rng(cfg.seed)
        self.n = e.num_envs
        self.spec = agent_spec(e)
        self.reward_bound = bounds.max_abs_reward(cfg)
        self.summary = Summary(total_steps=t.total_steps)
        self.ckpt = CheckpointManager(run_dir / CHECKPOINT_DIR, t.checkpoint_keep)
        self.eval_shares_env = eval_shares_env(e)
        self.envs, self.eval_env = make_envs(e)
        try:
            self.agent, self.buffer = make_agent(cfg, self.spec, self.device, bounds.q_bound(cfg))
        except BaseException:
            self.envs.close()  # a CARLA env restores the server's settings on close
            raise
        # a learning agent acts at random until trainer.learning_starts; one that does not learn, from the start
        self.warmup_steps = t.learning_starts if self.agent.learning else 0
        self.step = 0
        self.episodes = 0
        self.reconnects = 0  # CARLA: reconnects to the server after time-outs, so far
        self.resumed_from: Path | None = None
        self._resume()
        self.logger = loggers.make(cfg.logger, run_dir, purge_step=self.step if self.resumed_from else None)
        self.signals = StopSignals()
        for env in getattr(self.envs, "envs", ()):  # CARLA: a lost server is not waited for once a stop is pending
            if hasattr(env, "stop_pending"):
                env.stop_pending = lambda: self.signals.received is not None
        self.episode_stats = Episodes(self.n, backend(e).reward_components)
        self._flushed_step = self.step  # the step of the agent's last flush into the logs
        self._interval = (time.perf_counter(), self.step)  # where the current log interval began: (time, step)
        self.phases: NoPhases = NO_PHASES  # the loop's hook points (see time_phases); no-ops otherwise

    def time_phases(self, timer: NoPhases) -> None:
        """Charge each phase of the loop, at its hook points, and of a learning agent's update to ``timer``
        (``av-td3 bench``): the update is timed from outside (:class:`av_td3.timing.UpdatePhases`)."""
        self.phases = timer
        if self.agent.learning:
            UpdatePhases(self.agent, timer)

    # ---------------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        t, n = self.cfg.trainer, self.n
        if self.step == 0:
            space = self.envs.single_observation_space
            assert isinstance(space, gym.spaces.Dict)  # every backend's: {"image", "state"} (av_td3.envs.base)
            check_env(self.eval_env, space, self.cfg.env.eval_seed)
        obs, _ = self.envs.reset(seed=[self._episode_seed() for _ in range(n)])
        self._episodes_started(obs, np.arange(n))
        self._interval = (time.perf_counter(), self.step)
        pending_ckpt = False
        bar = self._progress()

        while self.step < t.total_steps:
            self.phases.begin_step(self.step)
            self.signals.check()
            action = self._act(obs)
            self.phases.lap("act")
            next_obs, reward, term, trunc, info = self.envs.step(action)
            self.phases.lap("env_step")
            prev_step, self.step = self.step, self.step + n
            last = self.step >= t.total_steps
            bar.update(self.step, warmup=prev_step < self.warmup_steps)

            if "reconnects" in info:  # CARLA: cumulative reconnects to the server after time-outs
                self.reconnects = int(np.max(info["reconnects"]))
            # CARLA: a step the simulator was lost in never happened; its episode ends there, unstored and uncounted.
            interrupted = np.asarray(info.get("interrupted", np.zeros(n, dtype=bool)), dtype=bool)
            self.episode_stats.add(reward, info)
            if self.buffer is not None:
                self.buffer.add(action, reward, next_obs, term, trunc, interrupted)
            self.phases.lap("store")
            ended = term | trunc
            for i in np.flatnonzero(ended).tolist():
                if interrupted[i]:
                    self.episode_stats.abandon(i)
                else:
                    self.logger.log_scalars(self.episode_stats.finish(i).scalars(), self.step)
            self.phases.lap("log")

            if self._update_due(prev_step):
                self._update()
            if crossed(prev_step, self.step, t.log_every) or last:
                self._log_interval(bar)
            self.phases.lap("log")
            evaluated = crossed(prev_step, self.step, t.eval_every) or last
            if evaluated:
                self._evaluate_and_log()
            pending_ckpt |= crossed(prev_step, self.step, t.checkpoint_every)
            # A single env checkpoints at the next episode end, so a resumed run replays identical episodes.
            if (pending_ckpt and (n > 1 or ended.all())) or last:
                self.summary.steps = self.step
                self.save_checkpoint()
                pending_ckpt = False
            self.phases.lap("eval_checkpoint")

            if evaluated and self.eval_shares_env:  # the evaluation took over the training env: start afresh
                ended[:] = True
                self.episode_stats.discard()
            # Ended episodes restart after the checkpoint, so a resumed run starts them with the same seeds.
            if ended.any() and not last:
                next_obs = self._restart(ended)
            obs = next_obs
            self.phases.lap("env_reset")
        bar.close()

    # --------------------------------------------------------------------------------------- steps of the loop
    def _act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Actions [n, a] for the observations of the n envs: uniform at random during the warm-up."""
        if self.step < self.warmup_steps:
            return self.rng.uniform(-1.0, 1.0, size=(self.n, self.spec.action_dim)).astype(np.float32)
        return self.agent.check_action(self.agent.act(obs, noise=self.cfg.agent.exploration_noise), self.step)

    def _update_due(self, prev_step: int) -> bool:
        """Updates begin with the first policy step: (total_steps - learning_starts) x updates_per_step in all."""
        return (self.buffer is not None and prev_step >= self.cfg.trainer.learning_starts
                and len(self.buffer) >= self.cfg.agent.batch_size)

    def _update(self) -> None:
        a = self.cfg.agent
        assert self.buffer is not None  # _update_due: only an agent with a replay buffer updates
        for _ in range(self.cfg.trainer.updates_per_step * self.n):
            batch = self.buffer.sample(a.batch_size, a.n_step, a.gamma)
            self.phases.lap("sample")
            self.agent.update(batch, self.step)  # under time_phases: laps critic, monitor, actor, target

    def _log_interval(self, bar: Progress) -> None:
        """The agent's metrics since the last interval, the interval's env steps per second, progress."""
        now = time.perf_counter()
        scalars = self.agent.flush(self.step).scalars
        start, start_step = self._interval
        scalars["perf/steps_per_s"] = (self.step - start_step) / max(now - start, 1e-9)
        if self.eval_shares_env:
            scalars["env/reconnects"] = float(self.reconnects)
        self.logger.log_scalars(scalars, self.step)
        self._interval = (now, self.step)
        self._flushed_step = self.step
        self._report(bar, scalars)

    def _evaluate_and_log(self) -> None:
        ev = self.evaluate()
        self.logger.log_scalars(ev, self.step)
        self.summary.final_eval = {k.removeprefix("eval/"): v for k, v in ev.items()}
        log.info("eval at step %d: return %.2f, success %.0f%%", self.step, ev["eval/return"],
                 100 * ev["eval/success_rate"])

    def evaluate(self) -> dict[str, float]:
        """Deterministic policy on the eval env with fixed seeds (eval_seed + i): comparable across runs and
        configurations; on a separate env instance the training episode in progress is not disturbed."""
        t, e = self.cfg.trainer, self.cfg.env
        return evaluation.evaluate(self.eval_env, self.agent, t.eval_episodes, e.eval_seed, self.step, self.logger)

    def _episode_seed(self) -> int:
        """Training episodes get explicit seeds, so a resumed run replays the same episodes."""
        self.episodes += 1
        return self.cfg.seed * 1_000_003 + self.episodes

    def _restart(self, ended: np.ndarray) -> dict[str, np.ndarray]:
        """Start new episodes in the envs where ``ended`` (bool [n]); the observations of all n envs."""
        seeds = [self._episode_seed() if e else None for e in ended]
        obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": ended})
        self._episodes_started({k: v[ended] for k, v in obs.items()}, np.flatnonzero(ended))
        return obs

    def _episodes_started(self, obs: dict[str, np.ndarray], env_ids: np.ndarray) -> None:
        """``obs``: the first observations of the new episodes in envs ``env_ids`` (int [m]), m rows each."""
        if self.buffer is not None:
            self.buffer.start_episode(obs, env_ids=env_ids)
        self.agent.reset(env_ids)

    # ----------------------------------------------------------------------------------------- train and stop
    def train(self) -> Summary:
        """Run the loop to ``trainer.total_steps``; on a stop (NaN guard, signal, simulator lost) checkpoint and
        re-raise. ``summary.json`` is written at the start and, whatever happens, at the end."""
        cfg = self.cfg
        self.summary.provenance = summary.provenance()
        write_summary(self.run_dir, self.summary)
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        assert isinstance(config, dict)  # the Config dataclass converts to a mapping
        self.logger.log_run_info(config, summary.flat_hparams(cfg), {"seed": str(cfg.seed), **self.summary.provenance})
        self.signals.install()
        log.info("training %d env steps into %s", cfg.trainer.total_steps, self.run_dir)
        start, wall0 = time.perf_counter(), self.summary.wall_s
        try:
            try:
                self._loop()
            except StopRequested:  # the env gave up on a lost simulator because a stop signal is pending
                self.signals.check()  # raises that stop, handled below like any other
                raise
            self.ckpt.wait()  # the final checkpoint is complete, or its error fails the run
            self.summary.status = COMPLETED
        except NonFiniteError as err:
            self.summary.nan_guard = {"triggered": True, "quantity": err.quantity, "step": err.step}
            self._stop(str(err))  # the weights are still the last good ones: the guard acted before the step
            log.error("NaN guard (monitor.nan_policy=stop): %s. The last good state is checkpointed in %s; lower "
                      "the learning rates or enable clipping, or use monitor.nan_policy=skip.", err, self.ckpt.dir)
            raise
        except Interrupted as err:
            self._stop(str(err))
            if isinstance(err, Preempted):
                log.warning("%s at env step %d: checkpoint written; the job is requeued and resumes from it.",
                            err, self.step)
            else:
                log.warning("%s at env step %d: checkpoint written.", err, self.step)
            raise
        except SimulatorLostError as err:
            self._stop(f"simulator lost: {err}")
            log.error("%s — checkpoint written.", err)
            raise
        except SimulatorUnusableError as err:
            self._stop(f"simulator unusable: {err}")
            log.error("%s — checkpoint written.", err)
            raise
        except BaseException as err:
            self.summary.status, self.summary.reason = FAILED, f"{type(err).__name__}: {err}"
            raise
        finally:
            self._wait_for_checkpoint()  # before the signal handlers go: a signal now cannot cut the write short
            self.signals.restore()
            summary.close(self.summary, self.step, wall0 + time.perf_counter() - start, self.agent.health(),
                          worst_return=-self.reward_bound * cfg.env.max_episode_steps)
            write_summary(self.run_dir, self.summary)
            if self.summary.final_eval is not None:
                self.logger.log_final(summary.flat_hparams(cfg), self.summary.final_eval)
            self.logger.close()
            self.close_envs()
        return self.summary

    def close_envs(self) -> None:
        """Close the training envs and the evaluation env (unless it is the training env itself)."""
        self.envs.close()
        if not self.eval_shares_env:
            self.eval_env.close()

    def _stop(self, reason: str) -> None:
        """A stop on purpose: record it, checkpoint, and log what the agent measured since the last interval."""
        self.summary.status, self.summary.reason = STOPPED, reason
        self.save_checkpoint()
        self.ckpt.wait()  # written before the stop is reported (a requeued job resumes from it at once)
        self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Log what the agent gathered since the last log interval, so `av-td3 validate` judges the run on every
        update it made. Called after the checkpoint, which keeps the unflushed interval: a resumed run logs it at
        its next interval, and these points (at the stop step) are purged on resume."""
        if self._flushed_step == self.step:
            return
        try:
            scalars = self.agent.flush(self.step).scalars
            if scalars:
                self.logger.log_scalars(scalars, self.step)
            self._flushed_step = self.step
        except Exception:  # the stop's own reason matters more than these points
            log.exception("could not log the metrics gathered since the last log interval")

    # ----------------------------------------------------------------------------------- checkpoint and resume
    def save_checkpoint(self) -> Path:
        """Checkpoint the state at this step; return the path the file gets. The loop waits only for copies of
        what later steps change (the agent's tensors, the replay buffer's filled rows); compressing and writing
        the file run in a background thread, one write at a time (the previous one is waited for first, and its
        error raised here). :meth:`train` waits for the last one on every way out."""
        self.ckpt.wait()  # before the copies: never two snapshots of the buffer in memory
        state = plain({"step": self.step, "episodes": self.episodes, "agent": self.agent.state_dict(),
                       "final_eval": self.summary.final_eval, "compat": resume.compat(self.cfg, self.spec),
                       "wall_s": self.summary.wall_s, "rng": resume.rng_state(self.rng)}, copy=True)
        pack_buffer = (self.buffer.snapshot() if self.cfg.trainer.checkpoint_buffer and self.buffer is not None
                       else None)

        def make_state() -> dict:  # in the background thread: compress the buffer's copy
            return state if pack_buffer is None else {**state, "buffer": pack_buffer()}

        return self.ckpt.save_in_background(make_state, self.step,
                                            lambda path: log.info("checkpoint written: %s", path))

    def _wait_for_checkpoint(self) -> None:
        """On the way out with an error already raised: let the write in flight finish (the process may exit
        next), logging its own failure rather than raising it over the error that stopped the run."""
        try:
            self.ckpt.wait()
        except Exception:
            log.exception("the checkpoint being written in the background failed")

    def _resume(self) -> None:
        t = self.cfg.trainer
        found = resume.find(t.resume, t.trust_checkpoint, self.ckpt)
        if found is None:
            return
        state, path = found
        resume.restore(state, path, resume.compat(self.cfg, self.spec), self.agent, self.buffer, self.rng)
        self.step, self.episodes = state["step"], state["episodes"]
        self.summary.wall_s = state.get("wall_s", 0.0)
        # a run resumed at its last step trains no further: its final evaluation comes from the checkpoint
        self.summary.final_eval = state.get("final_eval")
        self.resumed_from = path
        log.info("resumed from %s at env step %d (episode %d)", path, self.step, self.episodes)

    # ----------------------------------------------------------------------------------------------- progress
    def _progress(self) -> Progress:
        """A bar when on a terminal (and trainer.progress), else a progress line every 30 s; both with an ETA."""
        t = self.cfg.trainer
        return Progress(t.total_steps, self.step, t.learning_starts, bar=t.progress and sys.stderr.isatty())

    def _report(self, bar: Progress, scalars: dict[str, float]) -> None:
        alerts = sum(self.agent.health().alerts.values())
        # the interval's steps/s is not shown: an interval may straddle the warm-up; the bar measures its own rate
        bar.set_stats(f"last episode return {self.episode_stats.last_return:.1f} | alerts {alerts}")


def run(cfg: Config, run_dir: Path) -> Summary:
    """Train one run into ``run_dir``; its summary. Raises what stopped it (see :meth:`Trainer.train`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"the output dir {run_dir} is not writable: choose another with hydra.run.dir=PATH.")
    try:
        trainer = Trainer(cfg, run_dir)
    except BaseException as err:
        # .hydra/config.yaml already describes this attempt: an earlier attempt's summary must not pass for it.
        with contextlib.suppress(OSError):
            write_summary(run_dir, summary.failed(cfg, err))
        raise
    return trainer.train()
