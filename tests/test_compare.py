"""``av-td3 compare``: grouping, the statistics against hand-computed values, seed pairing, honest reporting of
incomplete, one-run and diverged groups, and an end-to-end run writing the table, CSV and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy.stats import bootstrap, trim_mean

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
    write_run(tmp_path / "b", [], seed=1)
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert sorted(g.label for g in groups) == ["[trainer.total_steps=300]", "[trainer.total_steps=50000]"]
    assert warnings == ["runs launched as `default` differ in their configs (trainer.total_steps): split into 2 "
                        "groups"]


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


def test_norm_scale_binding_and_verdicts_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in range(3):
        scalars = healthy_scalars(make_config())
        scalars["grad/critic/clip_fraction"] = [(st, 1.0) for st, _ in scalars["grad/critic/clip_fraction"]]
        scalars["grad/actor/clip_fraction"] = [(st, 0.0) for st, _ in scalars["grad/actor/clip_fraction"]]
        write_run(tmp_path / f"d{seed}", [], seed, scalars=scalars, summary={"final_eval": {"return": 10.0 + seed}})
        write_run(tmp_path / f"n{seed}", ["agent.clip.actor=5.0"], seed, scalars=scalars,
                  summary={"final_eval": {"return": 10.0 + seed}})
        write_run(tmp_path / f"u{seed}", UNCLIPPED, seed, summary={"final_eval": {"return": 100.0 + seed}})
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("group")
    assert csv.loc["default", "critic_norm_p50"] == pytest.approx(0.9 * 400.0)  # 0.9 x the fixture's total norm
    assert csv.loc["default", "critic_spikes_per_1k"] == 0.0
    assert "| 360/520/580 |" in printed  # critic norm p50/p90/p99 next to its clipping
    assert ("`default`: the critic's limit binds on 100% of updates: its clipping acts as gradient normalisation"
            in printed)
    assert "`default`: the actor's limit never binds (0% of updates clipped)" in printed
    assert "`default` and `agent.clip.actor=5.0` have identical final returns on every seed" in printed
    assert ("`agent.clip.actor=null,agent.clip.critic=null`: return IQM 101 (n=3): better than `default` "
            "(P(> baseline) 1.00 [1.00, 1.00])") in printed
    assert "`agent.clip.actor=5.0`: return IQM 11 (n=3): no clear difference from `default`" in printed


def test_two_seeds_give_no_conclusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in range(2):
        write_run(tmp_path / f"d{seed}", [], seed, summary={"final_eval": {"return": 10.0}})
        write_run(tmp_path / f"u{seed}", UNCLIPPED, seed, summary={"final_eval": {"return": 20.0}})
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "n=2 against `default`, no conclusion (run at least 3 seeds each)" in printed
    assert "(n=2: no conclusion)" in printed


# ------------------------------------------------------------------------------------------------ improvement
def _rows(returns: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"seed": list(returns), "return": list(returns.values())})


def test_improvement_pairs_by_seed_only_when_seeds_match() -> None:
    paired = improvement(_rows({0: 1.0, 1: 5.0, 2: 6.0}), _rows({2: 7.0, 1: 6.0, 0: 0.0}))
    assert paired["paired"] and paired["p_improvement"] == pytest.approx(1 / 3)
    unpaired = improvement(_rows({0: 1.0, 1: 5.0, 2: 6.0}), _rows({3: 0.0, 4: 6.0, 5: 7.0}))
    assert not unpaired["paired"] and unpaired["p_improvement"] == pytest.approx(3.5 / 9)
    single = improvement(_rows({0: 2.0}), _rows({0: 1.0, 1: 3.0}))
    assert single["p_improvement"] == 0.5 and np.isnan(single["p_ci_low"])


# ----------------------------------------------------------------------------------------------- end to end
def _sweep(root: Path) -> Path:
    """Clipped (3 seeds, one stopped by the NaN guard), unclipped (3 seeds), one-run group, crashed runs."""
    sweep = root / "sweep"
    common = ["experiment=clip_ablation", "debug=smoke"]
    for seed, ret in enumerate([10.0, 20.0, 30.0]):
        write_run(sweep / f"seed={seed}", common, seed,
                  scalars=healthy_scalars(make_config(common), final_return=ret))
        write_run(sweep / f"agent.clip.actor=null,agent.clip.critic=null,seed={seed}", [*common, *UNCLIPPED], seed,
                  scalars=healthy_scalars(make_config(UNCLIPPED), final_return=ret + 5))
    stopped = {"status": "stopped", "reason": "NaN guard: critic loss",
               "nan_guard": {"triggered": True, "quantity": "critic_loss", "step": 200},
               "alerts": {"critic/grad_explosion_critical": 2}, "final_eval": None}
    write_run(sweep / "agent.clip.actor=null,agent.clip.critic=null,seed=3", [*common, *UNCLIPPED], 3,
              summary=stopped)
    write_run(sweep / "agent.clip.critic=5.0,seed=0", [*common, "agent.clip.critic=5.0"], 0)
    write_run(sweep / "agent.clip.critic=5.0,seed=1", [*common, "agent.clip.critic=5.0"], 1, write_summary=False,
              stale=True)
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
    assert printed.startswith("| group | runs | return IQM [95% CI]")
    assert printed.split("\n\nVerdicts:")[0] in md

    csv = pd.read_csv(out / "comparison.csv").set_index("group")
    assert list(csv.index) == ["agent.clip.actor=null,agent.clip.critic=null", "agent.clip.critic=5.0", "default"]
    unclipped, one, default = (csv.loc[g] for g in csv.index)
    assert bool(default["is_baseline"]) and default["runs"] == 5 and default["incomplete"] == 2
    assert default["return_iqm"] == pytest.approx(20.0) and default["return_std"] == pytest.approx(10.0)
    # The NaN-guard stop counts as a diverged run, not a dropped one: 1 of 4 finished unclipped runs.
    assert unclipped["nan_guard_stops"] == 1 and unclipped["divergence_rate"] == pytest.approx(0.25)
    assert unclipped["stopped"] == 1 and unclipped["alerts"] == 2
    # Paired by seed? No: the unclipped group has a 4th seed (its stopped run has a last eval return).
    assert unclipped["n_return"] == 4 and not unclipped["paired"]
    assert np.isnan(unclipped["actor_clip_limit"]) and default["actor_clip_limit"] == 1.5

    assert "10 (n=1, no interval)" in md and "agent.clip.critic=5.0,seed=1: crashed" in md
    assert "seed=9: crashed at step 100 of 300" in md and "seed=8: running at step 150 of 300" in md
    assert "agent.clip.actor=null,agent.clip.critic=null,seed=3: diverged: NaN guard: non-finite critic_loss at " \
           "step 200" in md
    assert "critic/grad_explosion_critical: 2" in md  # counted as an alert of that (older) run, not a verdict
    for name in ("eval_return", "grad_norms", "alerts"):
        image = imread(out / "plots" / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # drawn, not blank
        assert f"plots/{name}.png" in md


def test_compare_pairs_seeds_and_honours_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, (clipped, unclipped) in enumerate([(10.0, 12.0), (20.0, 18.0), (30.0, 35.0)]):
        write_run(tmp_path / f"c{seed}", [], seed, summary={"final_eval": {"return": clipped}})
        write_run(tmp_path / f"u{seed}", UNCLIPPED, seed, summary={"final_eval": {"return": unclipped}})
    result = summarize(find_runs(tmp_path))
    assert result.baseline.label == "default"
    row = result.table.set_index("group").loc["agent.clip.actor=null,agent.clip.critic=null"]
    assert row["paired"] and row["p_improvement"] == pytest.approx(2 / 3)  # seeds 0 and 2 win
    assert "| 0.67 [0.00, 1.00] paired by seed |" in markdown_report(result, [])

    flipped = summarize(find_runs(tmp_path), baseline="agent.clip.actor=null,agent.clip.critic=null")
    assert flipped.table.set_index("group").loc["default", "p_improvement"] == pytest.approx(1 / 3)
    assert "(chosen with --baseline)" in markdown_report(flipped, [])
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out"), "--baseline", "nope"]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_each_group_is_stated_as_a_share_of_the_baseline(tmp_path: Path) -> None:
    """Targets such as "80% of PID" are read off the IQM / baseline column: the group's IQM and its interval over
    the baseline's IQM; the baseline's own cell is empty."""
    from av_td3.analysis.report import _cells

    write_run(tmp_path / "pid", ["agent=pid"], seed=0, summary={"final_eval": {"return": 200.0}})
    for seed, ret in enumerate([100.0, 180.0, 260.0]):
        write_run(tmp_path / f"td3_{seed}", [], seed, summary={"final_eval": {"return": ret}})
    summary = summarize(find_runs(tmp_path), baseline="agent=pid")
    row = summary.table.set_index("group").loc["default"]
    assert row["return_vs_baseline"] == pytest.approx(row["return_iqm"] / 200.0)
    assert row["return_vs_baseline_low"] == pytest.approx(row["return_ci_low"] / 200.0)
    assert row["return_vs_baseline_high"] == pytest.approx(row["return_ci_high"] / 200.0)
    cells = {s["group"]: _cells(s) for s in summary.table.to_dict("records")}
    low, high = row["return_ci_low"] / 2.0, row["return_ci_high"] / 2.0
    assert cells["default"]["IQM / baseline"] == f"{row['return_iqm'] / 2.0:.0f}% [{low:.0f}%, {high:.0f}%]"
    assert cells["agent=pid"]["IQM / baseline"] == "-"


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
