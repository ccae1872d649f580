"""``av-td3 bench``: throughput and memory side by side, in one process, on identical sizes.

The headline rows measure the shipped default configuration: ``conf/`` composed by Hydra as ``launch.py`` composes
it (plus ``BenchConfig.overrides``), so they follow the defaults when those change:

* ``update/default`` (``_monitor_off``): sample + update of the agent the trainer builds from that configuration;
  ``update/default_bf16``: the same update under ``torch.autocast`` with bfloat16 (bench only), skipped where
  bfloat16 autocast is unsupported;
* ``matmul/sgemm_<n>``: the machine's float32 matmul rate in this process (GFLOP/s), interleaved with the updates.
  Every update row carries its FLOP per update (counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  critic+actor cycle of ``policy_freq`` updates, averaged) and the fraction of the matmul rate it reaches;
* ``e2e/default``: a real training run at that configuration; ``e2e/default_sb3``: Stable-Baselines3's
  ``TD3.learn()`` on the same registered env (``av_td3/Highway-v0``) and sizes, right after it in the same process;
* the phase breakdown of ``e2e/default``'s training steps (act, env step, store, sample, critic, actor, target,
  monitor, log, ...), timed by an :class:`av_td3.timing.PhaseTimer` (the trainer's hook points, and
  :class:`av_td3.timing.UpdatePhases` around the agent's update);
* ``checkpoint/default_stall``, ``_write``, ``_size``: what a checkpoint with a full default-size replay buffer
  costs: the time ``Trainer.save_checkpoint`` holds the loop, the time until the file is complete, its size;
* ``regression/<code>_threads<N>`` (only with ``BenchConfig.against``, ``av-td3 bench --against REF``): training
  env steps/s of today's code and of an earlier commit, each run by its own ``launch.py`` in child processes,
  interleaved A B B A, at 1 torch thread and torch's default; ratios today / that commit.

Secondary rows keep the fixed sizes of the earlier issue (``BenchConfig.height`` ... ``batch_size``), written as a
training config of those sizes; every agent is built from a config by the trainer's own builders. Each row is
measured ``reps`` times; update rows are interleaved A B C, C B A, ... so slow drifts of the machine (other
processes, thermal state) hit every contender alike; medians are reported with the min and max.

Modules, one concern each (imports point down the list):

* :mod:`~av_td3.bench.run`: :func:`run_bench`, the entry: runs the sections, writes the files after each, keeps
  the finished sections' results on Ctrl-C; :mod:`~av_td3.bench.progress`: the line before each section (k of n,
  an estimate of its duration from the sizes);
* :mod:`~av_td3.bench.regression`: ``regression/*`` (a git worktree of the earlier commit, runs of both codes);
* :mod:`~av_td3.bench.updates`: ``update/*`` and ``matmul/*``; :mod:`~av_td3.bench.replay`: ``replay/*``;
  :mod:`~av_td3.bench.env`: ``env/*``; :mod:`~av_td3.bench.e2e`: ``e2e/*`` and the phase breakdown;
  :mod:`~av_td3.bench.checkpoint`: ``checkpoint/*``;
* :mod:`~av_td3.bench.report`: ratios and the markdown table;
* :mod:`~av_td3.bench.sb3`: the Stable-Baselines3 side (benchmark-only extra ``pip install '.[bench]'``);
* :mod:`~av_td3.bench.config`: :class:`BenchConfig`, presets, the training configs rows are built from;
  :mod:`~av_td3.bench.result`: rows, results, targets; :mod:`~av_td3.bench.machine`: the machine and process.

Everything goes into ``out`` (``bench.json``, ``bench.md``, the e2e and regression runs' folders); nothing else is
written elsewhere but the regression section's temporary git worktree, removed when it ends.
See benchmarks/README.md for what each row measures and the recorded runs.
"""

from av_td3.bench.config import BenchConfig, default_config, default_sizes, preset
from av_td3.bench.e2e import NOT_PER_STEP
from av_td3.bench.report import compute_ratios, markdown
from av_td3.bench.result import TARGETS, BenchResult, Row
from av_td3.bench.run import default_out, run_bench
from av_td3.bench.updates import count_flop, default_updater, interleave

__all__ = ["BenchConfig", "BenchResult", "NOT_PER_STEP", "Row", "TARGETS", "compute_ratios", "count_flop",
           "default_config", "default_out", "default_sizes", "default_updater", "interleave", "markdown", "preset",
           "run_bench"]
