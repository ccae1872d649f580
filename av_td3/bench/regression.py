"""``regression/*`` rows: today's code against an earlier commit of the same repository, on this machine, in one
bench run. A claim that the code got faster (or slower) is a ratio measured side by side like this, never an
absolute figure from another machine or another day.

The commit is checked out into a temporary ``git worktree`` (removed afterwards, on an error or Ctrl-C too). Each
code trains in child processes started with its own ``launch.py`` and its own folder as the working directory, so
each imports its own ``av_td3`` (``launch.py``'s folder comes first on ``sys.path``; checked before the runs). The
runs of the two codes alternate A B B A ... at each ``trainer.torch_threads`` of ``BenchConfig.regression_threads``
(1, and 0: torch's default). A run's rate is its learning-phase env steps/s: the trainer's ``perf/steps_per_s``
over the log intervals after ``learning_starts`` (as ``e2e/default``), their env steps over their seconds. The
ratio ``regression_vs_<commit>_threads<N>`` is today / the commit, the median over the pairs
(:func:`av_td3.bench.report.compute_ratios`).
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from av_td3.bench.config import BenchConfig
from av_td3.bench.e2e import learning_intervals
from av_td3.bench.result import REGRESSION_PREFIX, TODAY, BenchResult, Row, pair_ratios, paired_ratio, regression_row
from av_td3.rundir import DEFAULT_SCALARS_FILE

OUTPUT_TAIL_LINES = 25  # of a failed run's console output, quoted in the error


class RegressionError(Exception):
    """The regression rows cannot be measured (the ref, the checkout, or a run of either code); the message says
    which, and what to do."""


@dataclass(frozen=True)
class Code:
    """One side of the comparison: ``label`` names its rows (:data:`TODAY` or the commit's short hash), ``root``
    holds its ``launch.py``, ``what`` describes it in the notes and errors, ``overrides`` go on its command line
    (none: its own shipped default)."""
    label: str
    root: Path
    what: str
    overrides: tuple[str, ...]

    @property
    def config(self) -> str:
        return " ".join(self.overrides) if self.overrides else "its own shipped default"


def code_root() -> Path:
    """The checkout today's ``av_td3`` is imported from (the folder above the package, holding ``launch.py``)."""
    return Path(__file__).resolve().parents[2]


def bench_settings(cfg: BenchConfig, threads: int, run_dir: Path) -> dict[str, str]:
    """What the bench sets on both codes' command lines: a short run of ``cfg.regression_total_steps`` env steps,
    no evaluation or checkpoint before the end (one evaluation episode and no replay buffer in the final
    checkpoint: outside the timed window, kept short), ``trainer.torch_threads=threads``, into ``run_dir``. Each
    key is in the schema of today's code and of 7a659b0's (2026-11-29)."""
    big = 10 * cfg.regression_total_steps
    return {"trainer.total_steps": str(cfg.regression_total_steps),
            "trainer.learning_starts": str(cfg.regression_learning_starts),
            "trainer.log_every": str(cfg.regression_log_every), "trainer.torch_threads": str(threads),
            "trainer.progress": "false", "trainer.eval_every": str(big), "trainer.eval_episodes": "1",
            "trainer.checkpoint_every": str(big), "trainer.checkpoint_buffer": "false", "trainer.resume": "none",
            "trainer.device": cfg.device, "hydra.run.dir": f"'{run_dir}'"}  # quoted: a path may hold spaces


def check_overrides(overrides: tuple[str, ...] | list[str], option: str) -> None:
    """The overrides of ``option`` (``--against-overrides``, ``--today-overrides``) may not set a key the bench
    sets itself (:func:`bench_settings`)."""
    reserved = bench_settings(BenchConfig(), 0, Path(".")).keys()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in reserved:
            raise RegressionError(f"{option} {item}: {key} is set by the bench itself (the run's length, threads "
                                  "and folder; see BenchConfig.regression_*); leave it out")


def _git(root: Path, *args: str) -> str:
    """``git -C root args``'s output; RegressionError with git's own message when it fails."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RegressionError("git is not installed (the regression rows check out the earlier commit with git)") \
            from None
    if done.returncode != 0:
        raise RegressionError(f"git {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout.strip()


def resolve_ref(ref: str, root: Path | None = None) -> str:
    """The full hash of the commit ``ref`` (a hash, tag, branch, ``HEAD~1``, ...) names in the checkout ``root``
    (default: :func:`code_root`). RegressionError, naming the ref, when ``root`` is not a git checkout of av-td3 or
    the ref names no commit there."""
    root = code_root() if root is None else root
    where = f"--against {ref}"
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
    except RegressionError as err:
        top, why = "", str(err)
    else:
        why = f"its git checkout is {top}"
    if not top or Path(top).resolve() != root.resolve() or not (root / "launch.py").is_file():
        raise RegressionError(f"{where}: {root}, where av_td3 is imported from, is not a git checkout of av-td3 "
                              f"({why}); the regression rows run the earlier commit from a git worktree of it: run "
                              "av-td3 bench from a git clone installed with `pip install -e .`")
    if ref.startswith("-"):
        raise RegressionError(f"{where}: a ref cannot start with '-'; give a commit hash, tag or branch")
    try:
        return _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RegressionError:
        shallow = _git(root, "rev-parse", "--is-shallow-repository") == "true"
        raise RegressionError(f"{where}: no commit {ref!r} in {root}; give a commit hash, tag or branch of this "
                              "repository (e.g. HEAD~1 or 7a659b0)"
                              + (" (this clone is shallow: `git fetch --unshallow` fetches the older commits)"
                                 if shallow else "")) from None


@contextlib.contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """``commit`` checked out, detached, in a temporary ``git worktree`` of ``root``; removed on leaving the block,
    also on an error or Ctrl-C."""
    tmp = Path(tempfile.mkdtemp(prefix="av-td3-bench-"))
    path = tmp / commit[:7]
    try:
        _git(root, "worktree", "add", "--detach", str(path), commit)
        yield path
    finally:
        if path.exists():  # --force: the runs left __pycache__ folders in it
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(path)],
                           capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def check_imports_itself(code: Code) -> None:
    """Fail unless Python started in ``code.root`` imports ``av_td3`` from ``code.root/av_td3``, as ``launch.py``
    there will (the script's folder, like ``-c``'s working directory, comes first on ``sys.path``). Otherwise its
    runs would measure another copy, e.g. the installed one when PYTHONSAFEPATH is set."""
    done = subprocess.run([sys.executable, "-c", "import av_td3; print(av_td3.__file__)"], cwd=code.root,
                          capture_output=True, text=True, check=False)
    found = done.stdout.strip()
    if done.returncode != 0 or not found or Path(found).resolve().parent != (code.root / "av_td3").resolve():
        raise RegressionError(f"{code.what}: Python started in {code.root} imports av_td3 from "
                              f"{found or done.stderr.strip()[-500:]}, not from {code.root / 'av_td3'}, so its runs "
                              "would measure other code; unset PYTHONSAFEPATH (and -P) for av-td3 bench --against")


def learning_rate(code: Code, cfg: BenchConfig, threads: int, run_dir: Path) -> float:
    """Train ``code`` once with its overrides and :func:`bench_settings` (its own ``launch.py``, its
    root as the working directory) into ``run_dir``; return its learning-phase rate in env steps/s: the env steps
    of the log intervals wholly after ``learning_starts`` over their seconds."""
    settings = bench_settings(cfg, threads, run_dir)
    cmd = [sys.executable, "launch.py", *code.overrides, *(f"{k}={v}" for k, v in settings.items())]
    done = subprocess.run(cmd, cwd=code.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-OUTPUT_TAIL_LINES:])
        hint = ("\n--against-overrides go to both codes: give only keys both configurations know (--today-overrides "
                "go to today's code only)" if cfg.against_overrides else "")
        raise RegressionError(f"{code.what}: the training run failed (exit status {done.returncode}), run in "
                              f"{code.root} as\n  {' '.join(cmd)}\nthe end of its output:\n{tail}{hint}")
    scalars = run_dir / DEFAULT_SCALARS_FILE
    if not scalars.is_file():
        raise RegressionError(f"{code.what}: the run wrote no {scalars}; the rates are read from the CSV logger's "
                              "file: keep the csv logger (a default of both codes) and its file name")
    intervals = learning_intervals(scalars, cfg.regression_learning_starts, cfg.regression_log_every)
    return sum(n for n, _ in intervals) / sum(n / rate for n, rate in intervals)


def bench_regression(cfg: BenchConfig, out: Path, result: BenchResult, say: Callable[[str], None]) -> None:
    """Today's code vs the commit ``cfg.against`` names: ``regression/<code>_threads<N>`` rows of learning-phase
    env steps/s, one value per run, the runs' folders in ``out/regression/``."""
    if cfg.against is None:
        raise RegressionError("the regression section compares with an earlier commit: give it with --against REF")
    check_overrides(cfg.against_overrides, "--against-overrides")
    check_overrides(cfg.today_overrides, "--today-overrides")
    root = code_root()
    commit = resolve_ref(cfg.against, root)
    head = _git(root, "rev-parse", "--short=7", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain"))
    folder = out.resolve() / "regression"
    label = commit[:7]
    today = Code(TODAY, root, f"today's code ({root}, HEAD {head}{' with uncommitted changes' if dirty else ''})",
                 cfg.against_overrides + cfg.today_overrides)
    rates: dict[str, list[float]] = {}
    order: list[str] = []
    with worktree(root, commit) as old_root:
        old = Code(label, old_root, f"commit {label} (--against {cfg.against}, a git worktree)",
                   cfg.against_overrides)
        say(f"regression: today's code ({today.config}) vs {label} ({old.config}): {cfg.regression_pairs} pairs of "
            f"{cfg.regression_total_steps}-step runs at trainer.torch_threads in {list(cfg.regression_threads)}")
        for code in (old, today):
            check_imports_itself(code)
        for threads in cfg.regression_threads:
            for k in range(cfg.regression_pairs):
                for code in (old, today) if k % 2 == 0 else (today, old):  # A B B A ...: drifts hit both alike
                    name = regression_row(code.label, threads)
                    run_dir = folder / f"{name.removeprefix(REGRESSION_PREFIX)}_{k}"
                    rates.setdefault(name, []).append(learning_rate(code, cfg, threads, run_dir))
                    order.append(run_dir.name)
            new, was = rates[regression_row(TODAY, threads)], rates[regression_row(label, threads)]
            pairs = pair_ratios(new, was)
            say(f"regression at trainer.torch_threads={threads}: today {statistics.median(new):.1f}, {label} "
                f"{statistics.median(was):.1f} env steps/s while training; today / {label} = "
                f"{paired_ratio(new, was):.2f} (median over pairs; pairs from {min(pairs):.2f} to {max(pairs):.2f})")
    window = (f"{cfg.regression_total_steps}-step runs learning from {cfg.regression_learning_starts}, env steps/s "
              f"over the log intervals of {cfg.regression_log_every} after that, one value per run, each paired "
              "with the other code's run next to it")
    for code in (old, today):
        for threads in cfg.regression_threads:
            name = regression_row(code.label, threads)
            threads_text = f"trainer.torch_threads={threads}" + (" (torch's default)" if threads == 0 else "")
            result.rows.append(Row(name, "env steps/s", rates[name],
                                   f"{code.what}, {code.config}, {threads_text}; {window}"))
    result.config["regression"] = {"ref": cfg.against, "commit": commit, "today_head": head, "today_dirty": dirty,
                                   "overrides": {TODAY: list(today.overrides), label: list(old.overrides)},
                                   "runs_in_order": order}
