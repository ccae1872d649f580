"""What a comparison can conclude: effects judged by family-adjusted intervals (no verdict from noise, a real
effect found), power and the seeds a plan needs (`av-td3 plan`), the declared plan printed and every departure
from it flagged, each plan.* key taking effect, and the committed clip study read as what it is."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.power import TTestIndPower

from av_td3.analysis.compare import effects_against_baseline, summarize
from av_td3.analysis.metrics import METRICS
from av_td3.analysis.plan import Plan
from av_td3.analysis.runs import find_runs
from av_td3.cli import main
from tests.analysis_fixtures import healthy_scalars, make_config, write_run

ROOT = Path(__file__).resolve().parents[1]
ARMS = (["agent.clip.critic=50.0"], ["agent.clip.critic=100.0"], ["agent.clip.actor=null", "agent.clip.critic=null"])
PLAN = Plan("late_return", 0.5, None, 0.2, 0.05, 0.8, (), 3, True)


def _study(root: Path, means: list[float], seeds: int, sd: float, rng: np.random.Generator,
           extra: tuple[str, ...] = ()) -> None:
    """A baseline (the defaults) and one group per ARMS entry, each run's late return drawn from N(mean, sd)."""
    for overrides, mean in zip([[], *ARMS], means):
        for seed in range(seeds):
            overrides_ = [*overrides, *extra]
            write_run(root / f"{'_'.join(overrides) or 'default'}_{seed}", overrides_, seed, events=False, csv=True,
                      scalars=healthy_scalars(make_config(overrides_), level=float(rng.normal(mean, sd))))


def test_a_null_study_gets_no_better_or_worse_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Four groups of 10 seeds from one distribution (CV 15%): every arm inconclusive or equivalent."""
    _study(tmp_path, [300.0] * 4, seeds=10, sd=45.0, rng=np.random.default_rng(1))
    assert main(["compare", str(tmp_path), "--baseline", "default", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert set(table.loc[~table["is_baseline"], "verdict"]) <= {"inconclusive", "equivalent"}
    assert "better than" not in printed and "worse than" not in printed


def test_a_true_40_percent_effect_is_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _study(tmp_path, [300.0, 300.0, 300.0, 420.0], seeds=10, sd=45.0, rng=np.random.default_rng(2))
    assert main(["compare", str(tmp_path), "--baseline", "default", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    row = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("group").loc[
        "agent.clip.actor=null,agent.clip.critic=null"]
    assert row["verdict"] == "better" and row["effect_low"] > 0 and 0.25 < row["effect_pct"] < 0.55
    assert "`agent.clip.actor=null,agent.clip.critic=null`: late_return" in printed
    assert "better than `default` by +" in printed and "98.3% interval (Welch)" in printed


def _decide(groups: list[np.ndarray], plan: Plan = PLAN) -> list[str]:
    """compare's decision on groups[0] (baseline) against each other group, without run folders."""
    rows, metrics = [], {}
    for i, values in enumerate(groups):
        label = f"g{i}"
        metrics[label] = pd.DataFrame({"seed": np.arange(len(values)) + 100 * i, "finished": True,
                                       "late_return": values})
        rows.append({"group": label, "n": len(values), "mean": float(np.mean(values))})
    effects_against_baseline(rows, metrics, "g0", plan, "late_return")
    return [r["verdict"] for r in rows[1:]]


def test_false_verdicts_stay_within_alpha_for_the_whole_family() -> None:
    """400 null studies of 3 arms vs a baseline, 10 seeds each: the share with any better / worse verdict is at
    most alpha (0.05, Bonferroni is conservative) plus sampling error; a 40% effect is found in nearly all."""
    rng = np.random.default_rng(0)
    false = sum(any(v in ("better", "worse") for v in _decide([rng.normal(300, 45, 10) for _ in range(4)]))
                for _ in range(400))
    assert false / 400 <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 400)
    found = sum(_decide([rng.normal(300, 45, 10), rng.normal(420, 45, 10)])[0] == "better" for _ in range(100))
    assert found >= 95


def test_verdicts_need_five_runs_and_equivalence_needs_the_margin() -> None:
    rng = np.random.default_rng(3)
    strong = [rng.normal(300, 10, 4), rng.normal(600, 10, 4)]
    assert _decide(strong) == ["inconclusive"]  # a doubling, but 4 runs a group
    tight = [rng.normal(300, 5, 12), rng.normal(301, 5, 12)]
    assert _decide(tight) == ["equivalent"]  # within ±20%
    assert _decide(tight, Plan(**{**PLAN.__dict__, "effect": 0.001})) == ["inconclusive"]


def test_holm_is_statsmodels_holm() -> None:
    from statsmodels.stats.multitest import multipletests

    from av_td3.analysis import stats

    rng = np.random.default_rng(7)
    for k in (1, 2, 3, 5):
        p = rng.uniform(0, 0.2, k)
        assert stats.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_power_is_statsmodels_two_sample_t(tmp_path: Path) -> None:
    _study(tmp_path, [300.0, 300.0, 330.0, 360.0], seeds=4, sd=30.0, rng=np.random.default_rng(4))
    summary = summarize(find_runs(tmp_path), baseline="default")
    pw = summary.power
    d = TTestIndPower().solve_power(effect_size=None, nobs1=4, alpha=0.05 / 3, power=0.8)
    assert pw.n == 4 and pw.comparisons == 3 and pw.detectable == pytest.approx(d * pw.sd)
    n = TTestIndPower().solve_power(effect_size=0.2 * pw.base_mean / pw.sd, nobs1=None, alpha=0.05 / 3, power=0.8)
    assert pw.runs_for_effect == int(np.ceil(n))


def test_the_plan_command_gives_seeds_per_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _study(tmp_path, [300.0, 300.0, 300.0, 300.0], seeds=3, sd=40.0, rng=np.random.default_rng(5))
    assert main(["plan", str(tmp_path), "--baseline", "default", "--effect", "25%"]) == 0
    printed = capsys.readouterr().out
    pw = summarize(find_runs(tmp_path), baseline="default").power
    n = int(np.ceil(TTestIndPower().solve_power(effect_size=0.25 * pw.base_mean / pw.sd, nobs1=None,
                                                 alpha=0.05 / 3, power=0.8)))
    assert f"| ±25% | {0.25 * pw.base_mean:.4g} | {n} |" in printed
    assert "shared by 3 comparison(s)" in printed and "8 degrees of freedom" in printed
    assert main(["plan", str(tmp_path), "--baseline", "default", "--effect", "2%", "--arms", "1"]) == 0
    assert "shared by 1 comparison(s)" in capsys.readouterr().out
    assert main(["plan", str(tmp_path), "--effect", "lots"]) == 2
    assert "--effect lots" in capsys.readouterr().err


def test_a_declared_plan_is_printed_and_departures_are_flagged(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    plan = ("plan.baseline=agent.clip.actor=null,agent.clip.critic=null", "plan.seeds=[0,1,2,3,4]",
            "plan.effect=0.25")
    _study(tmp_path, [300.0] * 4, seeds=3, sd=30.0, rng=np.random.default_rng(6), extra=plan)
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Plan (recorded in the runs when they started): primary metric late_return")
    assert "baseline `agent.clip.actor=null,agent.clip.critic=null`, smallest effect of interest ±25%" in printed
    assert "seeds 0, 1, 2, 3, 4" in printed
    assert "Departure: `default`: 3 of 5 planned seeds finished (missing 3, 4)" in printed
    assert "inconclusive against `agent.clip.actor=null,agent.clip.critic=null`" in printed  # the plan's baseline
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out"), "--metric", "final_return",
                 "--baseline", "default"]) == 0
    printed = capsys.readouterr().out
    assert "Departure: the metric analysed is final_return, the plan's primary metric is late_return" in printed
    assert ("Departure: the baseline is `default`, the plan's is `agent.clip.actor=null,agent.clip.critic=null`"
            in printed)


def test_a_run_the_nan_guard_stopped_scores_its_warm_up_return_for_the_evaluations_it_missed(tmp_path: Path) -> None:
    """Rules v5: a diverged run stays in the return metrics, each evaluation after its stop at its random-action
    warm-up mean, so an arm's worst runs cannot leave its mean; a run that went on is scored as it was evaluated."""
    overrides = ["trainer.total_steps=300", "trainer.eval_every=50", "trainer.learning_starts=100"]
    full = healthy_scalars(make_config(overrides), level=300.0)  # evaluations 220 (steps 50-150), 300 (200-300)
    full["episode/return"] = [(50, -10.0), (100, -30.0), (200, 250.0)]  # warm-up (<= step 100): mean -20
    stopped = {tag: [(step, v) for step, v in points if step <= 150] for tag, points in full.items()}
    write_run(tmp_path / "stopped", overrides, 0, scalars=stopped, events=False, csv=True,
              summary={"status": "stopped", "steps": 160, "total_steps": 300,
                       "nan_guard": {"triggered": True, "quantity": "policy action", "step": 160}})
    write_run(tmp_path / "went_on", overrides, 1, scalars=full, events=False, csv=True)
    runs = {r.name: r for r in find_runs(tmp_path)}
    score = {name: {m: METRICS[m].compute(run, 0.5) for m in ("late_return", "auc_return", "final_return")}
             for name, run in runs.items()}
    assert score["stopped"] == {"late_return": -20.0, "auc_return": 100.0, "final_return": -20.0}
    assert score["went_on"] == {"late_return": 300.0, "auc_return": 260.0, "final_return": 300.0}


def test_seed_counts_say_when_no_run_of_the_group_records_the_plan(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A group whose runs all record another plan (e.g. an arm's runs at a setting the plan replaced) is not
    reported as if the plan had asked for its missing seeds without saying so."""
    plan = ("plan.seeds=[0,1,2,3,4]",)
    _study(tmp_path, [300.0] * 4, seeds=3, sd=30.0, rng=np.random.default_rng(7), extra=plan)
    for seed in range(3):  # the baseline's runs recorded an earlier plan (other seeds)
        write_run(tmp_path / f"default_{seed}", ["plan.seeds=[9]"], seed, events=False, csv=True,
                  scalars=healthy_scalars(make_config(["plan.seeds=[9]"]), level=300.0 + seed))
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ("Departure: `default`: 3 of 5 planned seeds finished (missing 3, 4; none of its runs records this "
            "plan)") in printed
    assert ("Departure: `agent.clip.critic=50.0`: 3 of 5 planned seeds finished (missing 3, 4)\n") in printed


@pytest.mark.parametrize("key, value, changed", [
    ("plan.metric", "final_return", "metric"),
    ("plan.late_fraction", "0.9", "mean"),
    ("plan.baseline", "agent.clip.critic=50.0", "baseline"),
    ("plan.effect", "0.5", "runs_for_effect"),
    ("plan.alpha", "0.2", "alpha"),
    ("plan.power", "0.95", "detectable"),
    ("plan.seeds", "[0,1,2,3]", "departures"),
    ("plan.rules", "2", "departures"),
])
def test_each_plan_key_takes_effect(tmp_path: Path, key: str, value: str, changed: str) -> None:
    def summary(folder: Path, extra: tuple[str, ...]):
        for overrides, levels in (([], [250.0, 300.0, 320.0]), (["agent.clip.critic=50.0"], [200.0, 260.0, 330.0])):
            for seed, level in enumerate(levels):
                scalars = healthy_scalars(make_config(), level=level)
                scalars["eval/return"][3] = (200, level + 150)  # the late window: after step 150, or 270 at 0.9
                write_run(folder / f"{len(overrides)}_{seed}", [*overrides, *extra], seed, scalars=scalars,
                          events=False, csv=True)
        return summarize(find_runs(folder))

    plain, changed_ = summary(tmp_path / "a", ()), summary(tmp_path / "b", (f"{key}={value}",))

    def pick(s):
        if changed in ("metric", "departures"):
            return getattr(s, changed)
        if changed == "baseline":
            return s.baseline.label
        if changed == "mean":
            return s.table["mean"].tolist()
        return getattr(s.power, changed)
    assert pick(plain) != pick(changed_)


def test_the_committed_clip_study_reads_inconclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """results/clip_study as committed (3 seeds an arm): the primary metric, each arm's effect in % with its
    adjusted interval, a detectable effect well above 30%, the seeds the plan's ±25% needs, and no better / worse."""
    assert main(["compare", str(ROOT / "results" / "clip_study"), "--baseline", "arm=td3_noclip",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    summary = summarize(find_runs(ROOT / "results" / "clip_study"), baseline="arm=td3_noclip")
    assert summary.metric == "late_return" and summary.power.detectable_share > 0.3
    assert summary.power.runs_for_effect > 3
    arms = summary.table.loc[~summary.table["is_baseline"]]
    # an arm with one archived seed so far is not compared (no verdict); every compared arm is inconclusive
    assert set(arms.loc[arms["n"] >= 2, "verdict"]) == {"inconclusive"}
    assert set(arms.loc[arms["n"] < 2, "verdict"]) <= {""}
    assert "better than" not in printed and "worse than" not in printed
    assert f"these runs detect only differences >= {summary.power.detectable_share:.0%}" in printed
    assert summary.plan.effect == 0.25  # the plan the study's runs record (conf/experiment/clip_study.yaml)
    assert f"about {summary.power.runs_for_effect} seeds per group for ±25%" in printed
    runs = len(find_runs(ROOT / "results" / "clip_study"))  # 12 made before plans existed, then the study's
    # the two 2026-12-02 runs that tripped rules v1 (the reason for v2) stay listed whatever runs are added
    flagged = re.search(rf"Under v1, (\d+) of the {runs} would be collapsed: (.*)", printed)
    assert flagged and int(flagged[1]) >= 2
    assert "2026-12-02_td3_s11/" in flagged[2] and "2026-12-02_td3_noclip_s11/" in flagged[2]


def test_power_never_fails_on_tiny_or_huge_effects() -> None:
    """Smoke runs give baselines near 0 and wild spreads: the seeds needed must still be a number (statsmodels'
    solver gives up there; the normal approximation takes over), never a crash."""
    from av_td3.analysis import stats

    n = stats.runs_needed(0.01, 50.0, 0.05, 0.8)  # d = 0.0002: about 400 million runs
    z = 1.959964 + 0.841621
    assert n == pytest.approx(2 * (z / 0.0002) ** 2, rel=1e-3)
    assert stats.runs_needed(1000.0, 1.0, 0.05, 0.8) == 2
    assert np.isfinite(stats.detectable_difference(2, 1.0, 0.05, 0.8))


def test_every_primary_metric_a_plan_may_name_is_a_metric_compare_computes() -> None:
    """plan.metric's choices (the schema) are spelled once more there; they must all be metrics.py's."""
    from dataclasses import fields

    from av_td3.analysis.metrics import METRICS
    from av_td3.config import PlanConfig

    choices = next(f for f in fields(PlanConfig) if f.name == "metric").metadata["choices"]
    assert choices and set(choices) <= set(METRICS)
