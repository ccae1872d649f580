"""``av-td3 compare --axis``: the "when" map splits runs into stress levels by config values, compares each level's
arms with that level's baseline with intervals adjusted for every comparison of the map, and writes its table,
CSV, plot and per-level reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy.stats import ttest_ind

from av_td3.analysis.runs import find_runs
from av_td3.analysis.whenmap import split_levels, write_when_map
from av_td3.cli import main
from tests.analysis_fixtures import healthy_scalars, make_config, write_run

UNCLIPPED = ["agent.clip.actor=null", "agent.clip.critic=null"]
SEEDS = [10, 11, 12, 13, 14]
BASE = [300.0, 250.0, 350.0, 310.0, 290.0]


def _arm(root: Path, overrides: list[str], levels: list[float]) -> None:
    for seed, level in zip(SEEDS, levels):
        write_run(root / f"{'_'.join(overrides) or 'default'}_{seed}", overrides, seed,
                  scalars=healthy_scalars(make_config(overrides), level=level), events=False, csv=True)


def _map(root: Path) -> dict[int, list[float]]:
    """Three levels of env.npcs (9, 10, 20: text order would put 10 first); the clipped arm gains 100 at 20
    NPCs only, and its values do not track the baseline's seed by seed (so the comparison is Welch's)."""
    clipped = {9: [275.0, 330.0, 305.0, 240.0, 340.0], 10: [300.0, 345.0, 265.0, 290.0, 305.0],
               20: [410.0, 390.0, 380.0, 420.0, 400.0]}
    for npcs, values in clipped.items():
        _arm(root / f"n{npcs}", [f"env.npcs={npcs}", *UNCLIPPED], BASE)
        _arm(root / f"n{npcs}", [f"env.npcs={npcs}"], values)
    return clipped


def test_levels_follow_the_axis_values_in_numeric_order(tmp_path: Path) -> None:
    _map(tmp_path)
    levels = split_levels(find_runs(tmp_path), ["env.npcs"])
    assert [label for label, _ in levels] == ["env.npcs=9", "env.npcs=10", "env.npcs=20"]
    assert all(len(runs) == 10 for _, runs in levels)
    two_keys = split_levels(find_runs(tmp_path), ["env.npcs", "agent.clip.mode"])
    assert two_keys[0][0] == "env.npcs=9, agent.clip.mode=norm"


def test_each_level_compared_with_its_own_baseline_at_the_map_wide_alpha(tmp_path: Path) -> None:
    clipped = _map(tmp_path)
    result = write_when_map(find_runs(tmp_path), ["env.npcs"], tmp_path / "out",
                            baseline="agent.clip.actor=null,agent.clip.critic=null")
    assert result.comparisons == 3 and result.alpha == pytest.approx(0.05 / 3)  # 1 arm x 3 levels
    rows = result.table[~result.table["is_baseline"].astype(bool)].set_index("level")
    for npcs, values in clipped.items():
        row = rows.loc[f"env.npcs={npcs}"]
        ci = ttest_ind(values, BASE, equal_var=False).confidence_interval(confidence_level=1 - 0.05 / 3)
        assert row["effect_pct"] == pytest.approx((np.mean(values) - np.mean(BASE)) / np.mean(BASE))
        assert (row["effect_pct_low"], row["effect_pct_high"]) == pytest.approx(
            (ci.low / np.mean(BASE), ci.high / np.mean(BASE)))
    assert rows.loc["env.npcs=20", "verdict"] == "better"
    assert set(rows.loc[["env.npcs=9", "env.npcs=10"], "verdict"]) == {"inconclusive"}
    csv = pd.read_csv(tmp_path / "out" / "when_map.csv")
    assert len(csv) == 6 and list(csv["level"].unique()) == ["env.npcs=9", "env.npcs=10", "env.npcs=20"]
    md = (tmp_path / "out" / "when_map.md").read_text()
    assert "shared by all 3 comparisons of the map" in md and "| `default` |" in md
    for i, level in enumerate(["env.npcs=9", "env.npcs=10", "env.npcs=20"]):
        report = tmp_path / "out" / "levels" / f"{i}_{level}" / "comparison.md"
        assert f"[report](levels/{i}_{level}/comparison.md)" in md and report.exists()
        assert "alpha 0.05 / 3 = 0.0167 each" in report.read_text()  # the level's own power, at the map's alpha
    image = imread(tmp_path / "out" / "plots" / "when_map.png")
    assert image.shape[1] > 400 and image.std() > 0.01  # drawn, not blank


def test_a_level_without_the_baseline_is_named_not_dropped(tmp_path: Path) -> None:
    _map(tmp_path)
    _arm(tmp_path / "n40", ["env.npcs=40"], BASE)  # only the clipped arm ran at 40 NPCs
    result = write_when_map(find_runs(tmp_path), ["env.npcs"], tmp_path / "out",
                            baseline="agent.clip.actor=null,agent.clip.critic=null")
    last = result.levels[-1]
    assert last.label == "env.npcs=40" and last.report is None and "is not a group" in last.problem
    assert result.comparisons == 4  # the family counts the level all the same
    md = (tmp_path / "out" / "when_map.md").read_text()
    assert "`env.npcs=40`: 5 run(s), no report: " in md


def test_a_level_of_another_study_keeps_its_own_plan_outside_the_maps_family(tmp_path: Path) -> None:
    """Runs read beside the map (here: env.npcs=5, recording another plan, as the main study's default condition
    beside the SGD map) are compared at their own plan's alpha, and the map's alpha is shared by the levels its
    own plan covers only: 1 arm x 3 levels, not x 4."""
    _map(tmp_path)
    other = ["env.npcs=5", "plan.effect=0.25"]
    _arm(tmp_path / "n5", [*other, *UNCLIPPED], BASE)
    _arm(tmp_path / "n5", other, [410.0, 390.0, 380.0, 420.0, 400.0])
    result = write_when_map(find_runs(tmp_path), ["env.npcs"], tmp_path / "out",
                            baseline="agent.clip.actor=null,agent.clip.critic=null")
    assert [lv.beside for lv in result.levels] == [True, False, False, False]
    assert result.comparisons == 3 and result.alpha == pytest.approx(0.05 / 3)
    assert "alpha 0.05 / 1 = 0.05 each" in (tmp_path / "out" / result.levels[0].folder / "comparison.md").read_text()
    assert "alpha 0.05 / 3 = 0.0167 each" in (tmp_path / "out" / result.levels[1].folder / "comparison.md").read_text()
    assert "`env.npcs=5`: 10 run(s)" in (md := (tmp_path / "out" / "when_map.md").read_text())
    assert "read beside the map: its runs record another study's plan" in md


def test_bad_axis_or_baseline_ends_with_exit_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _map(tmp_path)
    out = str(tmp_path / "out")
    assert main(["compare", str(tmp_path), "--out", out, "--axis", "env.npc"]) == 2
    err = capsys.readouterr().err
    assert "--axis env.npc: no run's config has this key" in err and "env.npcs" in err
    assert main(["compare", str(tmp_path), "--out", out, "--axis", "agent.name"]) == 2
    assert "every run sits at one level" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--out", out, "--axis", "env.npcs", "--baseline", "arm=nope"]) == 2
    assert "no level has the baseline group 'arm=nope'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--out", out, "--axis", "env.npcs",
                 "--baseline", "agent.clip.actor=null,agent.clip.critic=null"]) == 0
    assert "wrote " in capsys.readouterr().out and (tmp_path / "out" / "when_map.md").exists()
