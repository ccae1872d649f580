"""``av-td3`` command line: ``validate``, ``compare``, ``plan``, ``archive`` and ``bench`` (``python -m av_td3.cli``
works too).

Each subcommand is one ``_add_<name>`` function that declares its arguments and sets ``run``; adding one means
writing that function and listing it in ``SUBCOMMANDS``. Exit status: 0 success, 1 a check failed, 2 bad usage,
130 interrupted (``bench``, Ctrl-C).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

OK, FAILED, USAGE = 0, 1, 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _usage_error(command: str, message: str) -> int:
    print(f"av-td3 {command}: error: {message}", file=sys.stderr)
    return USAGE


def _validate(args: argparse.Namespace) -> int:
    # Imported here so `av-td3 --help` and other subcommands do not pay for pandas/tensorboard.
    from av_td3.analysis.runs import RunDiscoveryError, find_runs
    from av_td3.analysis.validate import check_run, report

    try:
        runs = find_runs(args.path)
    except RunDiscoveryError as e:
        return _usage_error("validate", str(e))
    if not any(r.has_scalars for r in runs):
        return _usage_error("validate", f"{args.path}: no TensorBoard event files (or scalars.csv) found")
    checks = [check_run(r) for r in runs]
    print(report(checks))
    return OK if all(c.ok for c in checks) else FAILED


def _load_runs(command: str, dirs: list[Path]) -> list | int:
    """The runs under ``dirs`` (each must hold some), or the usage exit code after printing why."""
    from av_td3.analysis.runs import RunDiscoveryError, find_runs

    runs = []
    for folder in dirs:
        try:
            found = find_runs(folder)
        except RunDiscoveryError as e:
            return _usage_error(command, str(e))
        if not found:
            return _usage_error(command, f"{folder}: no runs found (no .hydra/config.yaml or event files)")
        runs += found
    if all(r.config is None for r in runs):
        return _usage_error(command, "no run has a .hydra/config.yaml, so none can be grouped")
    return runs


def _compare(args: argparse.Namespace) -> int:
    from av_td3.analysis.report import notes, plan_lines, power_lines, verdicts, write_comparison

    runs = _load_runs("compare", args.dirs)
    if isinstance(runs, int):
        return runs
    out = args.out or args.dirs[0]
    if out.is_file():
        return _usage_error("compare", f"--out {out}: is a file, give a folder")
    if args.axis:
        return _when_map(args, runs, out)
    try:
        result = write_comparison(runs, out, baseline=args.baseline, metric=args.metric)
    except ValueError as e:  # an unknown --baseline label or --metric
        return _usage_error("compare", str(e))
    print("\n".join(plan_lines(result.summary)) + "\n")
    if result.summary.common:
        print(f"Every run: {' '.join(result.summary.common)}\n")
    print(result.table)
    print("\nPower:")
    print("\n".join(f"  {line}" for line in power_lines(result.summary)))
    print("\nVerdicts:")
    print("\n".join(f"  {line}" for line in verdicts(result.summary)))
    found = notes(result.summary)
    if found:
        print("\nNotes and warnings:")
        print("\n".join(f"  {line}" for line in found))
    print(f"\nwrote {out / 'comparison.md'}, {out / 'comparison.csv'} and {len(result.plots)} plots in "
          f"{out / 'plots'}")
    return OK


def _when_map(args: argparse.Namespace, runs: list, out: Path) -> int:
    from av_td3.analysis.whenmap import write_when_map

    try:
        result = write_when_map(runs, args.axis, out, baseline=args.baseline, metric=args.metric)
    except ValueError as e:  # an unknown --axis key, --baseline label or --metric
        return _usage_error("compare", str(e))
    print((out / "when_map.md").read_text())
    print(f"wrote {out / 'when_map.md'}, {out / 'when_map.csv'}, {out / 'plots' / 'when_map.png'} and "
          f"{sum(1 for lv in result.levels if lv.folder)} level reports in {out / 'levels'}")
    return OK


def _plan(args: argparse.Namespace) -> int:
    from av_td3.analysis.report import seeds_table

    runs = _load_runs("plan", args.dirs)
    if isinstance(runs, int):
        return runs
    try:
        effects = [_share(e) for e in args.effect]
        print(seeds_table(runs, effects, baseline=args.baseline, metric=args.metric, alpha=args.alpha,
                          power=args.power, arms=args.arms))
    except ValueError as e:
        return _usage_error("plan", str(e))
    return OK


def _share(text: str) -> float:
    """``20%`` or ``0.2`` -> 0.2."""
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise ValueError(f"--effect {text}: give a share of the baseline, e.g. 20% or 0.2") from None
    if not 0 < value < 10:
        raise ValueError(f"--effect {text}: give a share of the baseline between 0 and 1000%, e.g. 20%")
    return value


def _archive(args: argparse.Namespace) -> int:
    from av_td3.analysis.archive import archive
    from av_td3.analysis.runs import RunDiscoveryError

    if args.dest.exists() and not args.dest.is_dir():
        return _usage_error("archive", f"{args.dest}: is a file, give a folder")
    if args.dest.resolve() == args.source.resolve() or args.source.resolve() in args.dest.resolve().parents:
        return _usage_error("archive", f"{args.dest}: inside {args.source}; archive into a folder outside it "
                                       "(e.g. results/<study>/<sweep name>)")
    try:
        result = archive(args.source, args.dest, resumable_stops=args.resumable_stops)
    except RunDiscoveryError as e:
        return _usage_error("archive", str(e))
    for target in result.archived:
        print(f"archived {target}")
    for line in result.skipped:
        print(f"skipped {line}")
    for line in result.warnings:
        print(f"warning: {line}")
    if not result.archived:
        print(f"av-td3 archive: nothing archived from {args.source}", file=sys.stderr)
        return FAILED
    print(f"{len(result.archived)} run(s) archived into {args.dest}; read them with: av-td3 compare {args.dest}")
    return OK


def _bench(args: argparse.Namespace) -> int:
    try:
        return _bench_checked(args)
    except KeyboardInterrupt:  # before the first section or between two: run_bench handles Ctrl-C within one
        print("av-td3 bench: interrupted outside a section (bench.json and bench.md, if any, hold the finished "
              "sections)", file=sys.stderr)
        return INTERRUPTED


def _bench_checked(args: argparse.Namespace) -> int:
    import torch

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from av_td3.bench import default_config, default_out, markdown, preset, run_bench
    from av_td3.bench.config import ALL_SECTIONS
    from av_td3.bench.regression import RegressionError, check_overrides, resolve_ref
    from av_td3.bench.run import BenchInterrupted
    from av_td3.config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        return _usage_error("bench", "--device cuda but no CUDA device is available: use --device cpu")
    if args.threads < 0:
        return _usage_error("bench", f"--threads {args.threads}: give 0 (torch's default) or more")
    if args.pairs is not None and args.pairs < 1:
        return _usage_error("bench", f"--pairs {args.pairs}: give 1 or more")
    out = args.out or default_out()
    if out.is_file():
        return _usage_error("bench", f"--out {out}: is a file, give a folder")
    cfg = preset(args.quick)
    cfg.device, cfg.threads = args.device, args.threads
    if args.threads > 0:  # the regression runs too: on a busy machine, skip torch's spinning default threads
        cfg.regression_threads = (args.threads,)
    if args.pairs is not None:
        cfg.regression_pairs = cfg.busy_pairs = args.pairs
    if args.only:
        sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = [s for s in sections if s not in ALL_SECTIONS]
        if unknown:
            return _usage_error("bench", f"--only {args.only}: unknown section(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(ALL_SECTIONS)}")
        cfg.sections = sections
    cfg.overrides = tuple(args.overrides)
    try:
        default_config(cfg.overrides)
    except (HydraException, OmegaConfBaseException, ConfigError) as err:  # each message names the key
        return _usage_error("bench", f"{' '.join(args.overrides)}: {err}")
    if args.against is None:
        if "regression" in cfg.sections or args.against_overrides is not None or args.today_overrides is not None:
            return _usage_error("bench", "the regression rows compare with an earlier commit: give it with "
                                         "--against REF (e.g. --against HEAD~1)")
    else:
        cfg.against = args.against
        cfg.against_overrides = tuple(shlex.split(args.against_overrides or ""))
        cfg.today_overrides = tuple(shlex.split(args.today_overrides or ""))
        if "regression" not in cfg.sections:
            cfg.sections = ("regression", *cfg.sections)
        try:  # fail now, not after the other sections: a ref that names no commit, an override either code lacks
            resolve_ref(args.against)
            check_overrides(cfg.against_overrides, "--against-overrides")
            check_overrides(cfg.today_overrides, "--today-overrides")
            default_config(cfg.against_overrides + cfg.today_overrides)
        except RegressionError as err:
            return _usage_error("bench", str(err))
        except (HydraException, OmegaConfBaseException, ConfigError) as err:  # today's config: the key is named
            given = " ".join(f"{o} {v}" for o, v in (("--against-overrides", args.against_overrides),
                                                     ("--today-overrides", args.today_overrides)) if v)
            return _usage_error("bench", f"{given}: {err}")
    try:
        result = run_bench(cfg, out, quick=args.quick)
    except RegressionError as err:  # the earlier code could not run with these settings; the message says why
        return _usage_error("bench", str(err))
    except BenchInterrupted as err:  # one line instead of a traceback: what stopped, what is kept
        print(f"av-td3 bench: {err}", file=sys.stderr)
        return err.exit_code
    print()
    print(markdown(result))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return OK


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check runs: clip limits held, finite, both nets trained, no divergence",
                       description="Check every run under PATH against the limits in its own .hydra/config.yaml. "
                                   "Exit 0: all pass; 1: a check failed; 2: bad usage.")
    p.add_argument("path", type=Path, metavar="PATH",
                   help="a run folder, a sweep folder, or one TensorBoard event file")
    p.set_defaults(run=_validate)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="group runs by config, compare final returns, write table and plots",
                       description="Group the runs under DIR... by their overrides (seed pooled), write "
                                   "comparison.md, comparison.csv and plots/*.png, print the table.")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="sweep folders or single run folders")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    p.add_argument("--baseline", default=None,
                   help="group label to compare against (default: the plan's plan.baseline, else clipping at the "
                        "default limits)")
    p.add_argument("--metric", default=None, help="analyse another metric than the plan's primary metric "
                                                  "(plan.metric; the report names the departure): "
                                                  "late_return, auc_return, final_return, late_success, "
                                                  "late_collisions")
    p.add_argument("--axis", action="append", default=None, metavar="KEY",
                   help="a 'when' map: split the runs into levels by this config key's value (repeat for a level "
                        "made of several keys, e.g. --axis agent.optimizer --axis agent.lr.critic), compare each "
                        "level's arms with that level's baseline, all comparisons sharing the plan's alpha; writes "
                        "when_map.md, when_map.csv, plots/when_map.png and levels/*/comparison.md")
    p.set_defaults(run=_compare)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="seeds per group a study needs for an effect, from pilot runs' spread",
                       description="From the runs under DIR... (pilots, or a study so far) estimate the spread of "
                                   "the primary metric (the within-group SD pooled over the groups) and print, for "
                                   "each --effect, the seeds per group a two-sided two-sample t-test needs to "
                                   "detect it with --power at --alpha shared by the comparisons with the baseline. "
                                   "Write the answer into the experiment's plan.seeds before its runs start.")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="sweep folders, run folders or archives")
    p.add_argument("--effect", action="append", default=None, metavar="SHARE",
                   help="smallest effect of interest as a share of the baseline's mean, e.g. 20%% (repeatable; "
                        "default: the plan's plan.effect, and 10%%, 20%%, 30%%)")
    p.add_argument("--baseline", default=None, help="group label of the baseline (default: as compare)")
    p.add_argument("--metric", default=None, help="metric (default: the plan's plan.metric)")
    p.add_argument("--alpha", type=float, default=None, help="family alpha (default: the plan's plan.alpha)")
    p.add_argument("--power", type=float, default=None, help="power (default: the plan's plan.power)")
    p.add_argument("--arms", type=int, default=None,
                   help="groups the study will compare with the baseline (default: the groups found, minus one)")
    p.set_defaults(run=_plan)


def _add_archive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="keep finished runs' config, summary and scalars in a folder to commit",
                       description="Copy what compare and validate need of every finished run under SOURCE (config, "
                                   "overrides, summary.json, all scalars as scalars.csv.gz, code version) into DEST, "
                                   "one folder per run, well under 1 MB each. compare and validate read archived "
                                   "runs like run folders and pool them by configuration across folders. "
                                   "Exit 0: archived; 1: nothing to archive; 2: bad usage.")
    p.add_argument("source", type=Path, metavar="RUN_OR_SWEEP", help="a run folder or a sweep folder")
    p.add_argument("dest", type=Path, metavar="DEST", help="the archive folder, e.g. results/clip_study/<sweep>")
    p.add_argument("--resumable-stops", action="store_true",
                   help="archive runs stopped resumably (by a signal, a time-out or a lost simulator) as they are; "
                        "by default they are skipped: such a run is unfinished, resume it and archive it when it "
                        "ends (a stop by the NaN guard is a result and is always archived)")
    p.set_defaults(run=_archive)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="update, replay, simulator and training throughput, ours next to SB3",
                       description="Measure in one process, side by side on identical sizes: at the shipped "
                                   "default configuration (conf/, plus OVERRIDES) TD3 updates/s with FLOP/update "
                                   "and the fraction of the measured matmul rate, training env steps/s next to "
                                   "SB3's TD3.learn() and where a training step's time goes; at the fixed sizes "
                                   "of the older rows, TD3 updates/s (ours separate/shared, monitor on/off, SB3 "
                                   "TD3.train() if installed: pip install '.[bench]'), replay bytes per "
                                   "transition, embedded env steps/s and end-to-end training steps/s. With --against "
                                   "REF, also training env steps/s of today's code vs that earlier commit, run "
                                   "side by side (regression rows, ratios today / REF). Writes "
                                   "bench.json and bench.md into --out and prints the table. See "
                                   "benchmarks/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and shorter runs: about 1.5 min on an idle 2-core CPU instead of about "
                        "7 min (estimates; the bench prints its own before each section)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device (default: cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: a new outputs/bench/<timestamp>/)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: torch's default); N > 0 also runs the regression rows at N "
                        "threads only (default: at 1 and at torch's default)")
    p.add_argument("--only", default=None, metavar="SECTIONS",
                   help="comma-separated subset of update,replay,env,e2e,checkpoint (default: all), regression "
                        "(with --against) and busy (today's default under two busy processes, torch's default "
                        "threads vs one; never by default: it loads the machine on purpose)")
    p.add_argument("--pairs", type=int, default=None, metavar="N",
                   help="pairs of runs behind each regression and busy ratio, interleaved A B B A (default 2). A "
                        "machine whose speed drifts by minutes (a shared VM) needs more: the table prints the "
                        "lowest and highest pair's ratio next to the median")
    p.add_argument("--against", default=None, metavar="REF",
                   help="add the regression rows: training env steps/s of today's code (this checkout) vs the "
                        "commit REF (hash, tag, branch, HEAD~1) of this repository, checked out into a temporary "
                        "git worktree; short runs of both, interleaved A B B A, at 1 torch thread and torch's "
                        "default, printed as ratios today / REF")
    p.add_argument("--against-overrides", default=None, metavar="'KEY=VALUE ...'",
                   help="with --against: the same config overrides for both codes, in one quoted string (e.g. "
                        "'trainer.updates_per_step=2'; only keys both codes know). Default: each code at its own "
                        "shipped default")
    p.add_argument("--today-overrides", default=None, metavar="'KEY=VALUE ...'",
                   help="with --against: config overrides for today's code only, e.g. the earlier default's "
                        "settings where today's default differs, so both run the same workload: "
                        "'env.view=world agent.augment=none agent.clip.actor=1.0 agent.clip.critic=10.0' against "
                        "7a659b0")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                   help="config overrides for the default-configuration rows, as for training (e.g. "
                        "agent.batch_size=64 env.image.height=84)")
    p.set_defaults(run=_bench)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_validate, _add_compare, _add_plan,
                                                                    _add_archive, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="av-td3", description="Tools for av-td3 runs. Exit status: 0 success, "
                                                                "1 a check failed, 2 bad usage.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and bad usage (2); return it so tests can call main
        return e.code if isinstance(e.code, int) else USAGE
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
