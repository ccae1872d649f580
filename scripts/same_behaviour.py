"""Does this tree train exactly as another commit did? A check for refactorings that must not change behaviour.

    python scripts/same_behaviour.py <commit> [--out DIR] [--reuse-base]

Runs the same fixed-seed smoke trainings (``launch.py debug=smoke seed=0 trainer.torch_threads=1`` and the variants
in VARIANTS) once in a git worktree of ``<commit>`` and once in this tree, each into its own folder under ``--out``,
then compares, variant by variant:

- the scalars: every tag's (step, value) series in scalars.csv, bit for bit (``perf/*`` aside: wall-clock timings);
- summary.json, without its wall time, provenance (git commit, host) and the run folder's path in any text;
- the newest checkpoint: every tensor (dtype, shape, values) and every plain value, key by key.

Prints ``identical`` or where each comparison first differs, and exits 1 when anything differs (or a run
failed). Too slow for the test suite (a few minutes a run); tests/test_same_behaviour.py tests the comparisons.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["debug=smoke", "seed=0", "trainer.torch_threads=1", "trainer.progress=false"]
VARIANTS = {"default": [], "td3_adaptive": ["arm=td3_adaptive"], "td3_agc": ["arm=td3_agc"]}
TIMING_TAG_PREFIXES = ("perf/",)                  # wall-clock measurements: differ between any two runs
SUMMARY_IGNORED = ("wall_s", "provenance")        # how long and where, not what was computed
RUN_TIMEOUT_S = 3600


# ------------------------------------------------------------------------------------------------ comparisons
def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """tag -> [(step, value as written)] in file order, from scalars.csv (or an archive's scalars.csv.gz); the
    value's text is compared, so 0.1 and 0.1000000001 differ and nan equals nan."""
    path = run_dir / "scalars.csv"
    opener: Any = open
    if not path.is_file():
        path, opener = run_dir / "scalars.csv.gz", gzip.open
    series: dict[str, list[tuple[int, str]]] = {}
    with opener(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if not row["tag"].startswith(TIMING_TAG_PREFIXES):
                series.setdefault(row["tag"], []).append((int(row["step"]), row["value"]))
    return series


def compare_scalars(a: dict[str, list[tuple[int, str]]], b: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Where two runs' scalars differ: tags only one has, and each common tag's first differing point."""
    one_side = (("base", a.keys() - b.keys()), ("current", b.keys() - a.keys()))
    diffs = [f"tag {tag} only in {side}" for side, only in one_side
             for tag in sorted(only)]
    for tag in sorted(a.keys() & b.keys()):
        x, y = a[tag], b[tag]
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if first is not None:
            diffs.append(f"{tag}: first differs at step {x[first][0]}: {x[first][1]} vs {y[first][1]}")
        elif len(x) != len(y):
            diffs.append(f"{tag}: {len(x)} vs {len(y)} points")
    return diffs


def comparable_summary(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """summary.json without what differs between identical runs: wall time, provenance, and the run's folder in
    any text (a reason naming a file in it)."""
    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(str(run_dir.resolve()), "<run>").replace(str(run_dir), "<run>")
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub({k: v for k, v in summary.items() if k not in SUMMARY_IGNORED})


def compare_values(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """Where two nested structures (dicts, lists, tuples, tensors, arrays, plain values) differ, as key paths.
    Tensors must match in type, dtype, shape and every element (NaN equal to NaN in the same place)."""
    name = where or "<top>"
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                yield f"{path}: only in {'current' if key not in a else 'base'}"
            else:
                yield from compare_values(a[key], b[key], path)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            yield f"{name}: length {len(a)} vs {len(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from compare_values(x, y, f"{where}[{i}]")
        return
    if _is_array(a) or _is_array(b):
        yield from _compare_arrays(a, b, name)
        return
    if type(a) is not type(b):
        yield f"{name}: {type(a).__name__} vs {type(b).__name__}"
    elif isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b:
        yield f"{name}: {_short(a)} vs {_short(b)}"


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _compare_arrays(a: Any, b: Any, name: str) -> Iterator[str]:
    import numpy as np

    if type(a) is not type(b):
        yield f"{name}: {type(a).__name__} vs {type(b).__name__}"
        return
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        yield f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        return
    x = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    y = b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b)
    if x.dtype.kind in "fc":
        same = (x == y) | (np.isnan(x) & np.isnan(y))
    else:
        same = x == y
    if not np.all(same):
        index = tuple(int(i) for i in np.argwhere(~same)[0])
        yield f"{name}: {int((~same).sum())} of {same.size} elements differ, first at {index}: {x[index]} vs {y[index]}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def compare_runs(base: Path, current: Path) -> dict[str, list[str]]:
    """Every comparison of two run folders: "<what> (<how much was compared>)" -> the differences (empty:
    identical)."""
    import torch

    out: dict[str, list[str]] = {}
    sa, sb = read_scalars(base), read_scalars(current)
    out[f"scalars ({len(sa)} tags, {sum(map(len, sa.values()))} points)"] = compare_scalars(sa, sb)
    a = comparable_summary(json.loads((base / "summary.json").read_text()), base)
    b = comparable_summary(json.loads((current / "summary.json").read_text()), current)
    out[f"summary.json ({len(a)} fields)"] = list(compare_values(a, b))
    ca, cb = latest_checkpoint(base), latest_checkpoint(current)
    if ca is None or cb is None or ca.name != cb.name:
        out["checkpoint"] = [f"newest checkpoint: {ca and ca.name} vs {cb and cb.name}"]
    else:
        state = torch.load(ca, weights_only=True)
        tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor)]
        what = f"checkpoint {ca.name} ({len(tensors)} tensors, {sum(t.numel() for t in tensors)} elements)"
        out[what] = list(compare_values(state, torch.load(cb, weights_only=True)))
    return out


# ------------------------------------------------------------------------------------------------------- runs
def train(tree: Path, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """Start one smoke training of ``tree``'s code into ``run_dir`` (replaced), with this interpreter's packages;
    :func:`finish` waits for it."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    probe = subprocess.run([sys.executable, "-c", "import av_td3; print(av_td3.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True)
    if not Path(probe.stdout.strip()).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{tree}: imports av_td3 from {probe.stdout.strip()}, not from that tree")
    command = [sys.executable, "launch.py", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    print(f"  {tree}: {' '.join(command[1:])}", flush=True)
    log = open(run_dir.parent / f"{run_dir.name}.out", "w")
    return subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, run_dir: Path) -> None:
    code = process.wait(timeout=RUN_TIMEOUT_S)
    if code != 0 or not (run_dir / "summary.json").is_file():
        print((run_dir.parent / f"{run_dir.name}.out").read_text()[-3000:], file=sys.stderr)
        sys.exit(f"the run in {run_dir} failed (exit status {code})")


def worktree(commit: str, parent: Path) -> Path:
    path = parent / f"tree_{commit[:12]}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the commit to compare this tree with (e.g. the branch point)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--reuse-base", action="store_true",
                        help="keep the commit's runs already in --out (they do not depend on this tree)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once (default 1)")
    parser.add_argument("--compare-only", action="store_true", help="compare the runs already in --out, train none")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.commit}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    out = (args.out or Path(tempfile.mkdtemp(prefix="same-behaviour-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_tree = None if args.compare_only else worktree(commit, out)
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True).stdout.strip()
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() + (" with uncommitted changes" if status else "")
    print(f"comparing {commit[:12]} (base) with this tree, {here} (current); runs in {out}", flush=True)
    differs = False
    try:
        pending: list[tuple[subprocess.Popen, Path]] = []
        # every training at once (--jobs), each into its own folder
        for name in [] if args.compare_only else args.variants:
            base_run, current_run = out / "base" / name, out / "current" / name
            if not (args.reuse_base and (base_run / "summary.json").is_file()):
                assert base_tree is not None
                pending.append((train(base_tree, base_run, VARIANTS[name]), base_run))
            pending.append((train(ROOT, current_run, VARIANTS[name]), current_run))
            while len(pending) >= args.jobs:
                finish(*pending.pop(0))
        for process, run_dir in pending:
            finish(process, run_dir)
        for name in args.variants:
            print(f"{name} ({' '.join(COMMON + VARIANTS[name])}):")
            for what, diffs in compare_runs(out / "base" / name, out / "current" / name).items():
                if not diffs:
                    print(f"  {what}: identical")
                    continue
                differs = True
                print(f"  {what}: DIFFERS at {len(diffs)} place(s):")
                for line in diffs[:20]:
                    print(f"    {line}")
                if len(diffs) > 20:
                    print(f"    ... and {len(diffs) - 20} more")
    finally:
        if base_tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    print("RESULT: " + ("DIFFERS" if differs else f"identical to {commit[:12]} in every variant"))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
