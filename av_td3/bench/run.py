"""``run_bench``: run the selected sections in one process, then write ``bench.json`` and ``bench.md``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path

import torch

from av_td3.bench.checkpoint import bench_checkpoint
from av_td3.bench.config import BenchConfig
from av_td3.bench.e2e import bench_e2e
from av_td3.bench.env import bench_env
from av_td3.bench.machine import load_avg, machine_info
from av_td3.bench.regression import bench_regression
from av_td3.bench.replay import bench_replay
from av_td3.bench.report import compute_ratios, markdown
from av_td3.bench.result import BenchResult
from av_td3.bench.updates import bench_updates


def default_out() -> Path:
    """Where a run writes when no ``--out`` is given: a new ``outputs/bench/<timestamp>/``."""
    return Path("outputs") / "bench" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_bench(cfg: BenchConfig, out: Path, quick: bool = False,
              say: Callable[[str], None] = lambda s: print(s, flush=True)) -> BenchResult:
    """Run the sections of ``cfg.sections`` (regression, update, replay, env, e2e, checkpoint, in that order, so a
    regression run that cannot start fails first), write ``out/bench.json`` and ``out/bench.md``, return the
    result. ``quick`` is recorded only (``cfg`` already holds the preset); ``say`` receives one line per finished
    section. The regression section raises :class:`av_td3.bench.regression.RegressionError` when it cannot run."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    result = BenchResult(machine_info(device),
                         {**dataclasses.asdict(cfg), "quick": quick,
                          "timestamp": _dt.datetime.now().isoformat(timespec="seconds")})
    torch.manual_seed(cfg.seed)
    if "regression" in cfg.sections:
        bench_regression(cfg, out, result, say)
    if "update" in cfg.sections:
        bench_updates(cfg, device, result, say)
    if "replay" in cfg.sections:
        bench_replay(cfg, result, say)
    if "env" in cfg.sections:
        bench_env(cfg, result, say)
    if "e2e" in cfg.sections:
        bench_e2e(cfg, out, result, say)
    if "checkpoint" in cfg.sections:
        bench_checkpoint(cfg, out, result, say)
    result.machine["load_avg_1m_at_end"] = load_avg()
    result.ratios = compute_ratios(result)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "bench.md").write_text(markdown(result))
    return result
