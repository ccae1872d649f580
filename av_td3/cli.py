"""``av-td3`` command line: ``validate`` and ``compare`` (``python -m av_td3.cli`` works too).

Each subcommand is one ``_add_<name>`` function that declares its arguments and sets ``run``; adding one means
writing that function and listing it in ``SUBCOMMANDS``. Exit status: 0 success, 1 a check failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

OK, FAILED, USAGE = 0, 1, 2


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


def _compare(args: argparse.Namespace) -> int:
    from av_td3.analysis.compare import compare
    from av_td3.analysis.runs import RunDiscoveryError, find_runs

    runs = []
    for folder in args.dirs:
        try:
            found = find_runs(folder)
        except RunDiscoveryError as e:
            return _usage_error("compare", str(e))
        if not found:
            return _usage_error("compare", f"{folder}: no runs found (no .hydra/config.yaml or event files)")
        runs += found
    if all(r.config is None for r in runs):
        return _usage_error("compare", "no run has a .hydra/config.yaml, so none can be grouped")
    out = args.out or args.dirs[0]
    if out.is_file():
        return _usage_error("compare", f"--out {out}: is a file, give a folder")
    try:
        result = compare(runs, out, baseline=args.baseline)
    except ValueError as e:  # an unknown --baseline label
        return _usage_error("compare", str(e))
    print(result.table)
    print(f"\nwrote {out / 'comparison.md'}, {out / 'comparison.csv'} and {len(result.plots)} plots in "
          f"{out / 'plots'}")
    return OK


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check runs: clip limits held, finite, both nets trained, no divergence",
                       description="Check every run under PATH against the limits in its own .hydra/config.yaml. "
                                   "Exit 0: all pass; 1: a check failed; 2: bad usage.")
    p.add_argument("path", type=Path, metavar="PATH", help="a run folder, a sweep folder, or one TensorBoard event file")
    p.set_defaults(run=_validate)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="group runs by config, compare final returns, write table and plots",
                       description="Group the runs under DIR... by their overrides (seed pooled), write "
                                   "comparison.md, comparison.csv and plots/*.png, print the table.")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="sweep folders or single run folders")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    p.add_argument("--baseline", default=None,
                   help="group label to compare against (default: clipping at the default limits)")
    p.set_defaults(run=_compare)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_validate, _add_compare]


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
