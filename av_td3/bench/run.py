"""``run_bench``: run the selected sections in one process, saying which one runs (k of n, an estimate of its
duration), and write ``bench.json`` and ``bench.md`` after each; a Ctrl-C keeps the finished sections' results."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from av_td3.bench.busy import bench_busy
from av_td3.bench.checkpoint import bench_checkpoint
from av_td3.bench.config import ALL_SECTIONS, BenchConfig
from av_td3.bench.e2e import bench_e2e
from av_td3.bench.env import bench_env
from av_td3.bench.machine import load_avg, machine_info
from av_td3.bench.progress import done_line, estimate_s, plan_line, start_line
from av_td3.bench.regression import bench_regression
from av_td3.bench.replay import bench_replay
from av_td3.bench.report import compute_ratios, markdown
from av_td3.bench.result import BenchResult
from av_td3.bench.updates import bench_updates


def default_out() -> Path:
    """Where a run writes when no ``--out`` is given: a new ``outputs/bench/<timestamp>/``."""
    return Path("outputs") / "bench" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


class BenchInterrupted(Exception):
    """The bench was stopped (Ctrl-C, or SIGTERM during a training run) in a section. The message says which
    section and where the finished sections' results are (or that nothing was kept); ``exit_code`` is 128 + the signal
    number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_bench(cfg: BenchConfig, out: Path, quick: bool = False,
              say: Callable[[str], None] = lambda s: print(s, flush=True)) -> BenchResult:
    """Run the sections of ``cfg.sections`` (regression, busy, update, replay, env, e2e, checkpoint, in that order,
    so a regression run that cannot start fails first), writing ``out/bench.json`` and ``out/bench.md`` after each
    finished section (``config.sections_finished`` names them); return the result. ``quick`` is recorded only
    (``cfg`` already holds the preset). ``say`` receives a line before each section (k of n, an estimate of its
    duration), the sections' own lines, and a line when it is done.

    Raises :class:`BenchInterrupted` on Ctrl-C (and on a SIGTERM during a training run, whose trainer catches
    it): the interrupted section's files are removed, and so is ``out`` when it was created here and no section
    finished. The regression section raises :class:`av_td3.bench.regression.RegressionError` when it cannot run."""
    # a trainer turns Ctrl-C into Interrupted (after its checkpoint)
    from av_td3.train.signals import Interrupted

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    sections = [s for s in ALL_SECTIONS if s in cfg.sections]
    estimates = {s: estimate_s(s, cfg) for s in sections}
    say(plan_line(tuple(sections), estimates, quick))
    created = next((p for p in (*reversed(out.parents), out) if not p.exists()), None)  # the first folder made here
    out.mkdir(parents=True, exist_ok=True)
    result = BenchResult(machine_info(device),
                         {**dataclasses.asdict(cfg), "quick": quick,
                          "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "sections_finished": []})
    torch.manual_seed(cfg.seed)
    runners: dict[str, Callable[[], None]] = {
        "regression": lambda: bench_regression(cfg, out, result, say),
        "busy": lambda: bench_busy(cfg, out, result, say),
        "update": lambda: bench_updates(cfg, device, result, say),
        "replay": lambda: bench_replay(cfg, result, say),
        "env": lambda: bench_env(cfg, result, say),
        "e2e": lambda: bench_e2e(cfg, out, result, say),
        "checkpoint": lambda: bench_checkpoint(cfg, out, result, say),
    }
    for k, section in enumerate(sections, 1):
        say(start_line(k, len(sections), section, estimates[section]))
        before = set(out.iterdir())
        start = time.perf_counter()
        try:
            runners[section]()
        except (KeyboardInterrupt, Interrupted) as err:
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            raise BenchInterrupted(_interrupted(out, created, before, section, k, len(sections), result),
                                   128 + signum) from None
        say(done_line(k, len(sections), section, time.perf_counter() - start))
        result.config["sections_finished"].append(section)
        _write(out, result)
    return result


def _write(out: Path, result: BenchResult) -> None:
    """``bench.json`` and ``bench.md`` of the sections finished so far."""
    result.machine["load_avg_1m_at_end"] = load_avg()
    result.ratios = compute_ratios(result)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "bench.md").write_text(markdown(result))


def _interrupted(out: Path, created: Path | None, before: set[Path], section: str, k: int, n: int,
                 result: BenchResult) -> str:
    """Remove what the interrupted section wrote into ``out`` and, when no section finished, the folders this run
    created (``created`` and those below it down to ``out``); say what was interrupted and what is kept."""
    for path in set(out.iterdir()) - before:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    what = f"interrupted during section {section} ({k} of {n})"
    finished = result.config["sections_finished"]
    if finished:
        return (f"{what}; the finished section(s) {', '.join(finished)} are in {out / 'bench.json'} and "
                f"{out / 'bench.md'}")
    if created is not None:
        shutil.rmtree(out, ignore_errors=True)
        for parent in out.parents:  # e.g. outputs/bench/ made for this run's outputs/bench/<timestamp>/
            if parent != created and created not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: another run's folder is in it
                break
        return f"{what}; no section had finished, so nothing was kept ({out} removed)"
    return f"{what}; no section had finished, nothing was written into {out}"
