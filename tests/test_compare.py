"""``av-td3 compare``: grouping, the statistics against hand-computed values, seed pairing, honest reporting of
incomplete, one-run and diverged groups, and an end-to-end run writing the table, CSV and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy.stats import bootstrap, trim_mean, ttest_ind, ttest_rel
from statsmodels.stats.multitest import multipletests

from av_td3.analysis import stats
from av_td3.analysis.compare import default_baseline, group_runs, improvement, summarize
from av_td3.analysis.report import markdown_report
from av_td3.analysis.runs import find_runs
from av_td3.cli import main
from tests.analysis_fixtures import healthy_scalars, make_config, write_run, write_sweep

UNCLIPPED = ["agent.clip.actor=null", "agent.clip.critic=null"]


# ------------------------------------------------------------------------------------------------------ stats
def test_iqm_by_hand() -> None:
    assert stats.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5           # mean of 3, 4, 5, 6
    assert stats.iqm([8, 1, 100, 2, 7, 3, 6, 4]) == 5.0       # 3, 4, 6, 7: the outliers 1 and 100 are cut
    assert stats.iqm([5.0]) == 5.0


def test_iqm_ci_by_hand() -> None:
    # Two runs: a resample's IQM (nothing trimmed from 2 values) is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles are 0 and 1.
    assert stats.iqm_ci([0.0, 1.0]) == (0.0, 1.0)
    assert stats.iqm_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="at least 2 runs"):
        stats.iqm_ci([1.0])


def test_iqm_ci_matches_scipy_percentile_bootstrap() -> None:
    x = np.random.default_rng(1).normal(10.0, 3.0, size=12)
    ours = stats.iqm_ci(x, reps=4000)
    ref = bootstrap((x,), lambda a, axis: trim_mean(a, 0.25, axis=axis), n_resamples=4000, method="percentile",
                    random_state=0).confidence_interval
    assert ours[0] < stats.iqm(x) < ours[1]
    assert ours == pytest.approx((ref.low, ref.high), abs=0.3)  # Monte Carlo error of 4000 resamples


def test_probability_of_improvement_by_hand() -> None:
    # 6 pairs: (1,2) (1,2) lose, (2,2) (2,2) tie, (3,2) (3,2) win -> (2 + 0.5 x 2) / 6
    assert stats.probability_of_improvement([1, 2, 3], [2, 2]) == 0.5
    # 3 beats 1, 2 and ties 3 (2.5); 4 beats all three (3) -> 5.5 / 6
    assert stats.probability_of_improvement([3, 4], [1, 2, 3]) == pytest.approx(11 / 12)
    assert stats.probability_of_improvement([5, 6], [1, 2]) == 1.0


def test_paired_probability_of_improvement_by_hand() -> None:
    x, y = [1, 5, 6], [0, 6, 7]
    assert stats.probability_of_improvement(x, y, paired=True) == pytest.approx(1 / 3)   # seed 0 wins only
    assert stats.probability_of_improvement(x, y) == pytest.approx(3.5 / 9)             # 1 + 1 + 1.5 of 9
    assert stats.probability_of_improvement([1, 2], [1, 0], paired=True) == 0.75         # tie 0.5 + win 1


def test_probability_of_improvement_ci_by_hand() -> None:
    # One seed wins, one loses: resampled shares 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    assert stats.probability_of_improvement_ci([1, 2], [0, 3], paired=True) == (0.0, 1.0)
    assert stats.probability_of_improvement_ci([5, 6, 7], [1, 2], paired=False) == (1.0, 1.0)
    lo, hi = stats.probability_of_improvement_ci([1, 5, 6, 8], [0, 6, 7, 2])
    assert 0 <= lo <= stats.probability_of_improvement([1, 5, 6, 8], [0, 6, 7, 2]) <= hi <= 1


# --------------------------------------------------------------------------------------------------- grouping
def test_grouping_drops_seed_and_non_config_overrides(tmp_path: Path) -> None:
    common = ["debug=smoke", "experiment=clip_ablation", "trainer.torch_threads=2"]
    write_sweep(tmp_path / "sweep", [([*common, "agent.clip.actor=null"], 0), ([*common, "agent.clip.actor=null"], 1),
                                     (common, 0), (common, 1), ([*common, "agent.clip.actor=1.50"], 2)])
    groups, warnings, shared = group_runs(find_runs(tmp_path / "sweep"))
    assert shared == []  # the common overrides here are all non-config ones, dropped anyway
    # `=1.50` is the default's value: the same configuration, so one group, named as most of its runs were launched
    assert {g.label: len(g.runs) for g in groups} == {"agent.clip.actor=null": 2, "default": 3}
    assert warnings == ["group `default` pools runs launched as agent.clip.actor=1.5, default: their "
                        "configurations are the same"]
    assert default_baseline(groups).label == "default"  # fewest overrides among the default-limit groups


def test_grouping_from_config_when_overrides_are_missing(tmp_path: Path) -> None:
    for i, overrides in enumerate([["agent.clip.critic=5.0"], ["agent.clip.critic=5.0"], []]):
        (write_run(tmp_path / f"run{i}", overrides, seed=i) / ".hydra" / "overrides.yaml").unlink()
    groups, _, _ = group_runs(find_runs(tmp_path))
    assert {g.label: len(g.runs) for g in groups} == {"agent.clip.critic=5.0": 2, "agent.clip.critic=200.0": 1}
    assert default_baseline(groups).label == "agent.clip.critic=200.0"


def test_overrides_every_run_shares_are_left_out_of_the_labels(tmp_path: Path) -> None:
    shared = ["agent.encoder=shared", "trainer.total_steps=300"]
    write_sweep(tmp_path / "sweep", [([*shared, "agent.clip.actor=null"], 0), ([*shared, "agent.clip.actor=null"], 1),
                                     (shared, 0), ([*shared, "agent.clip.critic=5.0"], 0)])
    groups, _, common = group_runs(find_runs(tmp_path / "sweep"))
    assert common == ["agent.encoder=shared", "trainer.total_steps=300"]
    assert {g.label for g in groups} == {"agent.clip.actor=null", "default", "agent.clip.critic=5.0"}
    summary = summarize(find_runs(tmp_path / "sweep"), baseline="default")
    assert "Every run: `agent.encoder=shared trainer.total_steps=300`" in markdown_report(summary, [])
    # one group only: its overrides are its name, nothing to factor out
    write_sweep(tmp_path / "one_group", [(shared, 0), (shared, 1)])
    groups, _, common = group_runs(find_runs(tmp_path / "one_group"))
    assert common == [] and [g.label for g in groups] == ["agent.encoder=shared,trainer.total_steps=300"]


def test_runs_launched_alike_but_configured_differently_are_split_and_named(tmp_path: Path) -> None:
    # debug=smoke changes the config (here: total_steps) but is not part of the label, like in a real sweep.
    write_run(tmp_path / "a", ["trainer.total_steps=300"], seed=0)
    (tmp_path / "a" / ".hydra" / "overrides.yaml").write_text("- debug=smoke\n- seed=0\n")
    write_run(tmp_path / "b", ["trainer.total_steps=50000"], seed=1)
    (tmp_path / "b" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert sorted(g.label for g in groups) == ["[debug=smoke]", "default"]  # the preset says why, in a word
    assert warnings == ["runs launched as `default` differ in their configs (trainer.total_steps): split into 2 "
                        "groups"]
    # no preset explains it: the keys that differ name the groups
    (tmp_path / "a" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    groups, _, _ = group_runs(find_runs(tmp_path))
    assert sorted(g.label for g in groups) == ["[trainer.total_steps=300]", "[trainer.total_steps=50000]"]


def test_runs_with_the_same_config_pool_across_folders_and_spellings(tmp_path: Path) -> None:
    """Two sittings of one study: one launched with the key on the command line, one through a preset; the
    configurations match, so the runs are one group, and different code versions are warned about."""
    write_run(tmp_path / "monday" / "s0", ["env.npcs=20"], seed=0, summary={"provenance": {"git_commit": "aaa"}})
    write_run(tmp_path / "tuesday" / "s1", ["env.npcs=20"], seed=1, summary={"provenance": {"git_commit": "bbb"}})
    (tmp_path / "tuesday" / "s1" / ".hydra" / "overrides.yaml").write_text("- experiment=dense\n- seed=1\n")
    write_run(tmp_path / "monday" / "base", [], seed=0)
    runs = find_runs(tmp_path / "monday") + find_runs(tmp_path / "tuesday")
    groups, warnings, _ = group_runs(runs)
    assert {g.label: len(g.runs) for g in groups} == {"env.npcs=20": 2, "default": 1}
    assert "group `env.npcs=20` pools runs launched as default, env.npcs=20: their configurations are the same" \
        in warnings
    assert "group `env.npcs=20` pools runs from 2 code versions: aaa, bbb" in warnings


def test_another_backends_section_never_splits_a_group(tmp_path: Path) -> None:
    """results/clip_study holds highway runs recorded before and after env.carla.tm_port's default changed (8000,
    then null): the highway backend never reads env.carla.*, so they are one group; CARLA runs that differ there
    are two."""
    write_run(tmp_path / "old", [], seed=0)
    write_run(tmp_path / "new", [], seed=1)
    config = tmp_path / "old" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("tm_port: null", "tm_port: 8000"))
    assert "tm_port: 8000" in config.read_text()
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert [(g.label, len(g.runs)) for g in groups] == [("default", 2)] and warnings == []
    for name, port in (("carla_a", "null"), ("carla_b", "8000")):
        write_run(tmp_path / "carla" / name, ["env.name=carla", f"env.carla.tm_port={port}"], seed=0)
    groups, _, _ = group_runs(find_runs(tmp_path / "carla"))
    assert len(groups) == 2


def test_norm_scale_binding_and_verdicts_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in range(3):
        scalars = healthy_scalars(make_config(), level=100.0 + seed)
        scalars["grad/critic/clip_fraction"] = [(st, 1.0) for st, _ in scalars["grad/critic/clip_fraction"]]
        scalars["grad/actor/clip_fraction"] = [(st, 0.0) for st, _ in scalars["grad/actor/clip_fraction"]]
        write_run(tmp_path / f"d{seed}", [], seed, scalars=scalars)
        write_run(tmp_path / f"n{seed}", ["agent.clip.actor=5.0"], seed, scalars=scalars)
        write_run(tmp_path / f"u{seed}", UNCLIPPED, seed, scalars=healthy_scalars(make_config(), level=300.0 + seed))
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("group")
    assert csv.loc["default", "critic_norm_p50"] == pytest.approx(0.9 * 400.0)  # 0.9 x the fixture's total norm
    assert csv.loc["default", "critic_spikes_per_1k"] == 0.0
    assert "| 360/520/580 |" in printed  # critic norm p50/p90/p99 next to its clipping
    assert ("`default`: the critic's limit binds on 100% of updates: its clipping acts as gradient normalisation"
            in printed)
    assert "`default`: the actor's limit never binds (0% of updates clipped)" in printed
    assert "`default` and `agent.clip.actor=5.0` have identical late_return on every seed" in printed
    # Three times the baseline and every seed agreeing: still no verdict from 3 runs a group.
    unclipped = "`agent.clip.actor=null,agent.clip.critic=null`: late_return 301 (n=3, CV 0%): inconclusive"
    assert unclipped in printed and "n=3, fewer than the 5 runs per group a verdict needs" in printed
    assert "better than" not in printed and "worse than" not in printed


def test_two_seeds_give_no_conclusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in range(2):
        write_run(tmp_path / f"d{seed}", [], seed, scalars=healthy_scalars(make_config(), level=100.0 + seed))
        write_run(tmp_path / f"u{seed}", UNCLIPPED, seed, scalars=healthy_scalars(make_config(), level=200.0 - seed))
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "inconclusive against `default`" in printed
    assert "n=2, fewer than the 5 runs per group a verdict needs" in printed


# ------------------------------------------------------------------------------------------------ improvement
def _rows(returns: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"seed": list(returns), "final_return": list(returns.values())})


def test_improvement_pairs_by_seed_only_when_seeds_match() -> None:
    paired = improvement(_rows({0: 1.0, 1: 5.0, 2: 6.0}), _rows({2: 7.0, 1: 6.0, 0: 0.0}))
    assert paired["p_paired"] and paired["p_improvement"] == pytest.approx(1 / 3)
    unpaired = improvement(_rows({0: 1.0, 1: 5.0, 2: 6.0}), _rows({3: 0.0, 4: 6.0, 5: 7.0}))
    assert not unpaired["p_paired"] and unpaired["p_improvement"] == pytest.approx(3.5 / 9)
    single = improvement(_rows({0: 2.0}), _rows({0: 1.0, 1: 3.0}))
    assert single["p_improvement"] == 0.5 and np.isnan(single["p_ci_low"])


# ----------------------------------------------------------------------------------------------- end to end
def _sweep(root: Path) -> Path:
    """Clipped (3 seeds, one stopped by the NaN guard), unclipped (3 seeds), one-run group, crashed runs."""
    sweep = root / "sweep"
    common = ["experiment=clip_ablation", "debug=smoke"]
    for seed, ret in enumerate([100.0, 200.0, 300.0]):
        write_run(sweep / f"seed={seed}", common, seed,
                  scalars=healthy_scalars(make_config(common), final_return=ret))
        write_run(sweep / f"agent.clip.actor=null,agent.clip.critic=null,seed={seed}", [*common, *UNCLIPPED], seed,
                  scalars=healthy_scalars(make_config(UNCLIPPED), final_return=ret + 60))
    stopped = {"status": "stopped", "reason": "NaN guard: critic loss",
               "nan_guard": {"triggered": True, "quantity": "critic_loss", "step": 200},
               "alerts": {"critic/grad_explosion_critical": 2}, "final_eval": None}
    write_run(sweep / "agent.clip.actor=null,agent.clip.critic=null,seed=3", [*common, *UNCLIPPED], 3,
              summary=stopped)
    write_run(sweep / "agent.clip.critic=5.0,seed=0", [*common, "agent.clip.critic=5.0"], 0)
    write_run(sweep / "agent.clip.critic=5.0,seed=1", [*common, "agent.clip.critic=5.0"], 1, write_summary=False,
              stale=True)
    # stopped by a signal halfway, with evaluations in the late window: unfinished until resumed, not a result
    write_run(sweep / "agent.clip.critic=5.0,seed=2", [*common, "agent.clip.critic=5.0"], 2,
              summary={"status": "stopped", "reason": "interrupted by SIGTERM", "steps": 250, "final_eval": None,
                       "nan_guard": {"triggered": False, "quantity": None, "step": None}})
    write_run(sweep / "seed=9", common, 9, summary={"status": "running", "steps": 100, "final_eval": None},
              stale=True)
    write_run(sweep / "seed=8", common, 8, summary={"status": "running", "steps": 150, "final_eval": None})
    return sweep


def test_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path)
    out = tmp_path / "report"
    assert main(["compare", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "comparison.md").read_text()
    assert printed.startswith("Plan (recorded in the runs when they started): primary metric late_return")
    table = printed[printed.index("| group |"):printed.index("\n\nPower:")]
    assert table.startswith("| group | runs | steps/run | late return mean [95% CI] | CV | effect vs baseline "
                            "[adj. CI] |")
    assert table in md

    csv = pd.read_csv(out / "comparison.csv").set_index("group")
    assert list(csv.index) == ["agent.clip.actor=null,agent.clip.critic=null", "agent.clip.critic=5.0", "default"]
    unclipped, one, default = (csv.loc[g] for g in csv.index)
    assert bool(default["is_baseline"]) and default["runs"] == 5 and default["incomplete"] == 2
    # late window: the evaluations after step 150 of 300 (ramp k/6 x final return, k = 4, 5, 6): 5/6 of it
    assert default["mean"] == pytest.approx(200.0 * 5 / 6) and default["sd"] == pytest.approx(100.0 * 5 / 6)
    assert default["final_return_mean"] == pytest.approx(200.0)
    # The NaN-guard stop counts as a diverged run, not a dropped one: 1 of 4 finished unclipped runs.
    assert unclipped["nan_guard_stops"] == 1 and unclipped["diverged"] == 1 and unclipped["finished"] == 4
    assert unclipped["stopped"] == 1 and unclipped["alerts"] == 2
    # Paired by seed? No: the unclipped group has a 4th seed.
    assert unclipped["n"] == 4 and not unclipped["paired"]
    assert np.isnan(unclipped["actor_clip_limit"]) and default["actor_clip_limit"] == 1.5

    assert "83.33 (n=1, no interval)" in md and "agent.clip.critic=5.0,seed=1: crashed" in md
    assert one["incomplete"] == 2 and one["stopped"] == 0 and one["n"] == 1
    assert "agent.clip.critic=5.0,seed=2: stopped resumably at step 250 of 300 (interrupted by SIGTERM)" in md
    assert "seed=9: crashed at step 100 of 300" in md and "seed=8: running at step 150 of 300" in md
    assert "agent.clip.actor=null,agent.clip.critic=null,seed=3: diverged: NaN guard: non-finite critic_loss at " \
           "step 200" in md
    assert "critic/grad_explosion_critical: 2" in md  # counted as an alert of that (older) run, not a verdict
    for name in ("effects", "eval_return", "grad_norms", "alerts"):
        image = imread(out / "plots" / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 400 and image.std() > 0.01  # drawn, not blank
        assert f"plots/{name}.png" in md


def _level_runs(root: Path, overrides: list[str], levels: list[float], seeds: list[int] | None = None) -> None:
    for seed, level in zip(seeds or range(len(levels)), levels):
        write_run(root / f"{'_'.join(overrides) or 'default'}_{seed}", overrides, seed,
                  scalars=healthy_scalars(make_config(overrides), level=level))


def test_the_effect_is_the_difference_of_means_with_a_family_adjusted_welch_interval(tmp_path: Path) -> None:
    """Effect = mean - baseline mean, in % of the baseline mean; its interval is Welch's t at 1 - alpha / k for k
    comparisons; Holm's p-values go to the CSV. Seeds that differ: never paired."""
    base, a, b = [300.0, 250.0, 350.0, 310.0, 290.0], [400.0, 380.0, 420.0, 390.0, 410.0], [290.0, 320.0, 280.0]
    _level_runs(tmp_path, [], base)
    _level_runs(tmp_path, ["agent.clip.critic=50.0"], a, seeds=[10, 11, 12, 13, 14])
    _level_runs(tmp_path, ["agent.clip.critic=20.0"], b, seeds=[20, 21, 22])
    summary = summarize(find_runs(tmp_path), baseline="default")
    row = summary.table.set_index("group").loc["agent.clip.critic=50.0"]
    ci = ttest_ind(a, base, equal_var=False).confidence_interval(confidence_level=1 - 0.05 / 2)
    assert row["effect"] == pytest.approx(np.mean(a) - np.mean(base))
    assert (row["effect_low"], row["effect_high"]) == pytest.approx((ci.low, ci.high))
    assert row["effect_pct"] == pytest.approx(row["effect"] / np.mean(base))
    assert row["effect_pct_low"] == pytest.approx(ci.low / np.mean(base))
    assert not row["paired"] and row["verdict"] == "better"
    p = [ttest_ind(x, base, equal_var=False).pvalue for x in (a, b)]
    assert [row["p_holm"], summary.table.set_index("group").loc["agent.clip.critic=20.0", "p_holm"]] == \
        pytest.approx(list(multipletests(p, method="holm")[1]))
    assert summary.power.comparisons == 2 and summary.power.alpha == pytest.approx(0.025)
    assert summary.power.sd == pytest.approx(stats.pooled_sd([a, b, base]))


def test_same_seeds_pair_only_when_they_correlate(tmp_path: Path) -> None:
    base = [100.0, 200.0, 300.0, 400.0, 500.0]
    _level_runs(tmp_path / "p", [], base)
    _level_runs(tmp_path / "p", UNCLIPPED, [x + 20 + (-1) ** i for i, x in enumerate(base)])
    row = summarize(find_runs(tmp_path / "p"), baseline="default").table.set_index("group").iloc[0]
    assert row["paired"]
    x = np.array([x + 20 + (-1) ** i for i, x in enumerate(base)])
    ci = ttest_rel(x, base).confidence_interval(confidence_level=0.95)
    assert (row["effect_low"], row["effect_high"]) == pytest.approx((ci.low, ci.high))
    assert row["verdict"] == "better"  # a 20-point gain every seed, seen through a 100-point spread by pairing
    _level_runs(tmp_path / "u", [], base)
    _level_runs(tmp_path / "u", UNCLIPPED, [320.0, 100.0, 510.0, 220.0, 410.0])  # same seeds, no correlation
    row = summarize(find_runs(tmp_path / "u"), baseline="default").table.set_index("group").iloc[0]
    assert not row["paired"]


def test_compare_honours_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _level_runs(tmp_path, [], [100.0, 110.0, 120.0])
    _level_runs(tmp_path, UNCLIPPED, [130.0, 140.0, 150.0])
    result = summarize(find_runs(tmp_path))
    assert result.baseline.label == "default" and "(clipping at the default limits)" in markdown_report(result, [])
    flipped = summarize(find_runs(tmp_path), baseline="agent.clip.actor=null,agent.clip.critic=null")
    assert flipped.table.set_index("group").loc["default", "effect"] == pytest.approx(-30.0)
    assert "(named by --baseline or the plan)" in markdown_report(flipped, [])
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out"), "--baseline", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out"), "--metric", "nope"]) == 2
    assert "--metric 'nope' is not a metric" in capsys.readouterr().err


def test_the_report_names_the_machines_its_wall_times_come_from(tmp_path: Path) -> None:
    xeon = {"provenance": {"machine": "Intel(R) Xeon(R) Processor, 2 logical cores"}}
    write_run(tmp_path / "a", [], seed=0, summary=xeon)
    write_run(tmp_path / "b", [], seed=1)  # a run from before the machine was recorded
    md = markdown_report(summarize(find_runs(tmp_path)), [])
    assert "- `default`: Intel(R) Xeon(R) Processor, 2 logical cores; not recorded" in md


def test_compare_bad_usage_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2


def test_a_controller_without_gradients_is_labelled_so(tmp_path: Path) -> None:
    from av_td3.analysis.report import _cells

    write_run(tmp_path / "td3", [], seed=0)
    scalars = {tag: v for tag, v in healthy_scalars(make_config(["agent=pid"], 0)).items()
               if tag.startswith(("eval/", "episode/"))}  # agent=pid logs no grad/ or train/ tags
    write_run(tmp_path / "pid", ["agent=pid"], seed=0, scalars=scalars)
    summary = summarize(find_runs(tmp_path), baseline="agent=pid")
    cells = {row["group"]: _cells(row) for row in summary.table.to_dict("records")}
    assert cells["agent=pid"]["actor clipping"] == cells["agent=pid"]["critic clipping"] == "no gradients logged"
    assert cells["default"]["critic clipping"].endswith("(limit 200)")


def test_a_baseline_evaluated_once_is_drawn_as_a_level(tmp_path: Path) -> None:
    """A short controller run has one evaluation: a line through one point has no length, so the plot draws a
    marker there and a dashed level across, labelled so; learning curves stay lines."""
    from av_td3.analysis.plots import eval_return_figure

    write_run(tmp_path / "td3", [], seed=0)  # six evaluations
    write_run(tmp_path / "pid", ["agent=pid"], seed=0, scalars={"eval/return": [(5000, 223.0)]})
    groups, _, _ = group_runs(find_runs(tmp_path))
    ax = eval_return_figure({g.label: g.runs for g in groups}).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    pid = next(line for label, line in lines.items() if label.startswith("agent=pid"))
    assert pid.get_linestyle() == "--" and list(pid.get_ydata()) == [223.0, 223.0]
    assert "evaluated at step 5,000 only: dashed level" in pid.get_label()
    td3 = lines["default (n=1)"]
    assert td3.get_linestyle() in ("-", "-.", ":") and len(td3.get_xdata()) == 6
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {pid.get_label(), td3.get_label()}


def test_a_run_made_under_an_older_default_is_labelled_with_it(tmp_path: Path, monkeypatch) -> None:
    """After a shipped default changes (rundir.DEFAULTS_CHANGED), a run that held the old value without asking for
    it is named by it, so its group is never read as today's default; an override or an arm= choice already says
    what the run was."""
    from av_td3 import rundir

    monkeypatch.delitem(rundir.DEFAULTS_CHANGED, "agent.clip.critic", raising=False)  # as before it changed
    write_run(tmp_path / "old", ["env.lead_vehicle=false", "agent.clip.critic=5"], seed=0)
    write_run(tmp_path / "arm", ["arm=td3_noclip", "agent.clip.critic=5"], seed=0)
    for path in (tmp_path / "old", tmp_path / "arm"):  # ran at critic 5 when that was the default: no override
        overrides = path / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text().replace("- agent.clip.critic=5\n", ""))
    assert {g.label for g in group_runs(find_runs(tmp_path))[0]} == {"env.lead_vehicle=false", "arm=td3_noclip"}
    monkeypatch.setitem(rundir.DEFAULTS_CHANGED, "agent.clip.critic", "2026-12-02")
    labels = {g.label for g in group_runs(find_runs(tmp_path))[0]}
    assert labels == {"agent.clip.critic=5.0,env.lead_vehicle=false", "arm=td3_noclip"}


# ---------------------------------------------------------------------------------------------- run verdicts
def test_a_run_that_never_learns_is_labelled_failed(tmp_path: Path) -> None:
    """The stressed runs' pattern (results/clip_stress): every evaluation at the crash return."""
    from av_td3.analysis.verdicts import judge

    crashed = healthy_scalars(make_config())
    crashed["eval/return"] = [(step, -9.86) for step, _ in crashed["eval/return"]]
    verdict = judge(find_runs(write_run(tmp_path / "crash", scalars=crashed))[0])
    assert verdict.failed == ("its best level -9.86 (mean of 2 evaluation(s)) never rose more than "
                              "monitor.learn_min_gain = 50 above 15.67, the mean return of its 1 random-action "
                              "warm-up episode(s)")
    assert judge(find_runs(write_run(tmp_path / "learned", []))[0]).failed is None  # 91.7 against 15.7
    # already good at its first evaluation (v3 called this failed): judged against the random-action episodes
    early = healthy_scalars(make_config())
    early["eval/return"] = [(s, v) for s, v in zip(range(50, 301, 50), [286.5, 161.0, 345.6, 300.0, 290.0, 310.0])]
    assert judge(find_runs(write_run(tmp_path / "early", scalars=early))[0]).failed is None
    lenient = write_run(tmp_path / "lenient", ["monitor.learn_min_gain=5"], scalars=crashed)
    assert judge(find_runs(lenient)[0]).failed is not None
    crashed["eval/return"][-2:] = [(250, 25.0), (300, 25.0)]  # +9.3 over 15.67: learned for a threshold of 5
    assert judge(find_runs(write_run(tmp_path / "small", ["monitor.learn_min_gain=5"], scalars=crashed))[0]).failed \
        is None
    summary = summarize(find_runs(tmp_path / "crash"))
    assert "failed to learn" in markdown_report(summary, []) and summary.table.iloc[0]["failed"] == 1


def test_q_far_above_the_returns_the_run_played_is_divergence(tmp_path: Path) -> None:
    """The reward bound (max|r| / (1 - gamma) x 2 = 4,960 at the defaults) is never reached by a Q that runs away
    from returns of ~100: |Q| = 400 is 4x the largest return played, beyond monitor.q_return_factor = 3."""
    from av_td3.analysis.verdicts import judge

    inflated = healthy_scalars(make_config())
    inflated["train/q_abs_max"] = [(step, 400.0 if step >= 200 else 8.0) for step, _ in inflated["train/q_abs_max"]]
    verdict = judge(find_runs(write_run(tmp_path / "run", scalars=inflated))[0])
    assert verdict.diverged == ("|train/q_abs_max| = 400 at step 200, more than monitor.q_return_factor = 3 x the "
                                "largest |return| the run played (100)")
    assert verdict.diverged_step == 200
    assert judge(find_runs(write_run(tmp_path / "loose", ["monitor.q_return_factor=5"],
                                     scalars=inflated))[0]).diverged is None


def test_agc_is_reported_per_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AGC clips unit by unit: its share is of units, its limit moves with each unit's weights (none is shown)."""
    from av_td3.analysis.report import _cells

    agc = ["agent.clip.mode=agc", "agent.clip.agc=0.1"]
    write_run(tmp_path / "agc", agc, seed=0)
    summary = summarize(find_runs(tmp_path))
    cells = _cells(summary.table.iloc[0].to_dict())
    assert cells["critic clipping"] == "50% of units clipped (agc, lambda 0.1)"  # the fixture's clip fraction


def test_runs_evaluated_on_more_episodes_pool_with_a_note(tmp_path: Path) -> None:
    write_run(tmp_path / "old", ["trainer.eval_episodes=5"], seed=0)
    (tmp_path / "old" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")  # ran when 5 was the default
    write_run(tmp_path / "new", [], seed=1)
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert [g.label for g in groups] == ["default"] and len(groups[0].runs) == 2
    assert "group `default` pools runs evaluated on 5 and 10 episodes per evaluation" in " ".join(warnings)


def test_short_runs_are_said_to_be_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "smoke", ["debug=smoke"], seed=0)  # the fixture's 300 steps
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| 300 |" in printed  # steps/run
    assert "300-step runs, the default run is 50,000 steps: their returns and verdicts say little" in printed


def test_the_alerts_plot_says_in_one_panel_when_nothing_fired(tmp_path: Path) -> None:
    from av_td3.analysis.plots import plot_alerts

    write_run(tmp_path / "a", [], seed=0)  # the fixture fires no alert
    write_run(tmp_path / "b", UNCLIPPED, seed=0)
    groups, _, _ = group_runs(find_runs(tmp_path))
    plot_alerts({g.label: g.runs for g in groups}, tmp_path / "alerts.png")
    image = imread(tmp_path / "alerts.png")
    assert image.shape[0] < 200  # one short panel, not one per group
