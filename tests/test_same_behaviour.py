"""The comparisons of scripts/same_behaviour.py (the script itself trains, too slow for the suite)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "same_behaviour.py"
spec = importlib.util.spec_from_file_location("same_behaviour", SCRIPT)
assert spec is not None and spec.loader is not None
same = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same)


def _run(path: Path, rows: list[str], summary: dict, state: dict) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "scalars.csv").write_text("step,tag,value\n" + "".join(r + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps(summary))
    torch.save(state, path / "checkpoints" / "step_0000000300.pt")
    return path


def test_identical_runs_compare_identical_whatever_their_timings_and_folders(tmp_path: Path) -> None:
    state = {"actor": {"w": torch.ones(2, 3)}, "step": 300, "rng": torch.arange(3), "stats": [1.0, float("nan")]}
    a = _run(tmp_path / "a", ["50,train/q,0.5", "50,perf/sps,12.0"],
             {"status": "completed", "wall_s": 1.0, "provenance": {"host": "x"}, "reason": f"{tmp_path / 'a'}/f"},
             state)
    b = _run(tmp_path / "b", ["50,train/q,0.5", "50,perf/sps,99.0"],
             {"status": "completed", "wall_s": 2.0, "provenance": {"host": "y"}, "reason": f"{tmp_path / 'b'}/f"},
             state)
    assert same.compare_runs(a, b) == {"scalars (1 tags, 1 points)": [], "summary.json (2 fields)": [],
                                       "checkpoint step_0000000300.pt (2 tensors, 9 elements)": []}


def test_each_difference_is_named_where_it_first_occurs(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", ["50,train/q,0.5", "100,train/q,0.6", "50,train/only_a,1"],
             {"status": "completed", "objective": 1.0},
             {"actor": {"w": torch.zeros(2, 2)}, "step": 300})
    changed = torch.zeros(2, 2)
    changed[1, 0] = 1e-7
    b = _run(tmp_path / "b", ["50,train/q,0.5", "100,train/q,0.60000001"],
             {"status": "stopped", "objective": 1.0},
             {"actor": {"w": changed}, "step": 300, "extra": 1})
    diffs = dict(zip(["scalars", "summary.json", "checkpoint"], same.compare_runs(a, b).values()))
    assert diffs["scalars"] == ["tag train/only_a only in base",
                                "train/q: first differs at step 100: 0.6 vs 0.60000001"]
    assert diffs["summary.json"] == ["status: 'completed' vs 'stopped'"]
    checkpoint = diffs["checkpoint"]
    assert checkpoint[0].startswith("actor.w: 1 of 4 elements differ, first at (1, 0)")
    assert checkpoint[1] == "extra: only in current"


def test_tensors_of_another_dtype_or_shape_differ() -> None:
    assert list(same.compare_values(torch.zeros(2), torch.zeros(2, dtype=torch.float64), "w")) == [
        "w: torch.float32(2,) vs torch.float64(2,)"]
    assert list(same.compare_values(torch.zeros(2), torch.zeros(3), "w")) == [
        "w: torch.float32(2,) vs torch.float32(3,)"]
    assert list(same.compare_values((1, 2), [1, 2], "t")) == ["t: tuple vs list"]
