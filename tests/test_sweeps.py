"""Sweeps: experiment files compose with command-line overrides, job folders are named by their overrides, a
sweep runs end to end and `av-td3 compare` reads it, a failed job is reported with a non-zero exit, a rerun skips
completed jobs, and the launcher / Optuna presets work. Sweeps use tiny runs (SHORT) so the file stays short."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from av_td3 import bounds
from av_td3.config import to_config
from av_td3.rundir import FAILED_OBJECTIVE, Summary, write_summary
from av_td3.sweep import (COMPLETED_CONFIG, EXIT_SWEEP_INCOMPLETE, SWEEP_SUMMARY, SweepSummary, collect,
                          compare_command, completed_objective, missing_launcher_plugin, record_completed)

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
# Tiny runs: 120 steps, learning from step 60, evaluations at 60 and 120 on 30-step episodes.
SHORT = ["trainer.total_steps=120", "trainer.learning_starts=60", "trainer.eval_every=60",
         "env.max_episode_steps=30"]
# One torch thread per job (not part of job folder names): on a busy 2-core machine torch's default of a thread
# per core makes tiny runs many times slower.
ONE_THREAD = "trainer.torch_threads=1"


def hydra_compose(*overrides: str, hydra: bool = True) -> DictConfig:
    """The composed config; with ``hydra=False`` without the hydra node, as the task function receives it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def sweep_jobs(*overrides: str) -> list[list[str]]:
    """The jobs the basic sweeper makes: the experiment's hydra.sweeper.params first, then the command line (the
    order BasicSweeper.sweep uses), so a command-line key replaces the experiment's list for that key."""
    parser = OverridesParser.create()
    cfg = hydra_compose(*(o.input_line for o in parser.parse_overrides(list(overrides)) if not o.is_sweep_override()))
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    return BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), max_batch_size=None)[0]


def launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SDL_VIDEODRIVER", None)
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def job_name(*overrides: str) -> str:
    return ",".join(sorted(overrides))  # Hydra's override_dirname: sorted key=value, joined by commas


def summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- composing
@pytest.mark.parametrize("experiment, params", [
    ("clip_ablation", {"agent.clip.actor": "1.5,null", "agent.clip.critic": "200.0,null", "seed": "0,1,2"}),
    ("clip_limits", {"agent.clip.actor": "0.15,1.5,15.0", "agent.clip.critic": "20.0,200.0,2000.0",
                     "seed": "0,1,2"}),
    ("traffic_density", {"env.npcs": "20,50,100", "seed": "0,1,2"}),
    ("clip_study", {"arm": "td3_noclip,td3,td3_adaptive,td3_zscore,td3_agc", "seed": "10,11,12,13,14,15,16,17"}),
    ("clip_stress", {"arm": "td3_noclip,td3_zscore", "seed": "10,11,12"}),
    ("clip_when", {"arm": "td3_noclip,td3,td3_adaptive,td3_zscore,td3_agc", "agent.lr.critic": "0.001,0.01,0.03",
                   "seed": "40,41,42,43,44"}),
    ("clip_control", {"arm": "td3_noclip,td3_adaptive", "seed": "30,31,32,33,34"}),
    ("clip_control_lr1e-1", {"arm": "td3_noclip,td3_sgd_limits", "seed": "50,51,52,53,54"}),
])
def test_experiment_files_set_name_sweep_dir_and_params(experiment: str, params: dict) -> None:
    cfg = hydra_compose(f"experiment={experiment}", "debug=smoke")
    assert cfg.experiment_name == experiment
    assert re.fullmatch(rf"outputs/multirun/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{experiment}", cfg.hydra.sweep.dir)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == params
    for override in {o for job in sweep_jobs(f"experiment={experiment}") for o in job}:  # every value is valid
        to_config(hydra_compose(f"experiment={experiment}", override, hydra=False))


def test_the_clip_study_declares_its_plan_and_sweeps_the_planned_seeds() -> None:
    """The plan is in the experiment file, so every run of the sweep records it; its seeds are the sweep's."""
    cfg = hydra_compose("experiment=clip_study", "debug=smoke")
    study = to_config(hydra_compose("experiment=clip_study", hydra=False))
    assert [int(s) for s in cfg.hydra.sweeper.params.seed.split(",")] == list(study.plan.seeds)
    assert (study.plan.metric, study.plan.baseline, study.plan.effect) == ("late_return", "arm=td3_noclip", 0.25)
    assert study.plan.baseline.split("=")[1] in cfg.hydra.sweeper.params.arm.split(",")


def test_the_when_map_declares_its_plan_and_moves_both_nets_along_one_axis() -> None:
    """Every level runs SGD with momentum with both nets at the level's rate; the plan's seeds are the sweep's and
    none was used by the main study or a pilot."""
    cfg = hydra_compose("experiment=clip_when", "debug=smoke")
    when = to_config(hydra_compose("experiment=clip_when", hydra=False))
    assert [int(s) for s in cfg.hydra.sweeper.params.seed.split(",")] == list(when.plan.seeds)
    assert (when.plan.metric, when.plan.baseline, when.plan.effect) == ("late_return", "arm=td3_noclip", 0.5)
    study = to_config(hydra_compose("experiment=clip_study", hydra=False))
    assert not set(when.plan.seeds) & set(range(10, 23)) and 0 not in when.plan.seeds
    assert study.plan.seeds[0] == 10
    for rate in (1e-3, 1e-2, 3e-2):
        level = to_config(hydra_compose("experiment=clip_when", f"agent.lr.critic={rate}", "arm=td3_agc",
                                        hydra=False))
        assert (level.agent.optimizer, level.agent.momentum) == ("sgd", 0.9)
        assert (level.agent.lr.actor, level.agent.lr.critic) == (rate, rate)
        assert level.agent.clip.mode == "agc" and level.trainer.total_steps == 15000


def test_the_positive_control_runs_the_selected_level_with_its_declared_plan() -> None:
    """pilot 6's level (SGD with momentum at 1e-2 for both nets, 15k steps), the plan declared with it in
    docs/results/clip-study.md, and fresh seeds: none a pilot's, the main study's or the when-map's."""
    cfg = hydra_compose("experiment=clip_control", "debug=smoke")
    control = to_config(hydra_compose("experiment=clip_control", "arm=td3_adaptive", hydra=False))
    assert [int(s) for s in cfg.hydra.sweeper.params.seed.split(",")] == list(control.plan.seeds) == [30, 31, 32,
                                                                                                        33, 34]
    plan = control.plan
    assert (plan.metric, plan.baseline, plan.effect, plan.alpha, plan.power) == (
        "late_return", "arm=td3_noclip", 1.0, 0.05, 0.8)
    assert (control.agent.optimizer, control.agent.momentum) == ("sgd", 0.9)
    assert (control.agent.lr.actor, control.agent.lr.critic, control.trainer.total_steps) == (1e-2, 1e-2, 15000)
    assert control.agent.clip.mode == "adaptive"
    when = to_config(hydra_compose("experiment=clip_when", hydra=False))
    assert not set(plan.seeds) & (set(range(10, 23)) | set(when.plan.seeds) | {0})


def test_the_stressed_condition_sets_its_learning_rates_and_length_and_smoke_still_shrinks_it() -> None:
    stress = to_config(hydra_compose("experiment=clip_stress", "arm=td3_zscore", hydra=False))
    assert (stress.agent.lr.actor, stress.agent.lr.critic, stress.trainer.total_steps) == (9e-3, 9e-3, 15000)
    assert stress.agent.clip.mode == "zscore"
    default = to_config(hydra_compose(hydra=False))
    assert stress.agent.lr.actor == pytest.approx(30 * default.agent.lr.actor)  # the comment's "thirty times"
    assert stress.agent.lr.critic == pytest.approx(30 * default.agent.lr.critic)
    smoke = to_config(hydra_compose("experiment=clip_stress", "debug=smoke", hydra=False))
    assert smoke.trainer.total_steps == 300 and smoke.agent.lr.actor == 9e-3  # debug composes after experiment


def test_plain_sweep_dir_has_no_experiment_suffix() -> None:
    cfg = hydra_compose()
    assert cfg.experiment_name is None
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.sweep.dir)


def test_command_line_list_replaces_the_experiments_list() -> None:
    jobs = sweep_jobs("experiment=clip_ablation")
    assert len(jobs) == 12
    jobs = sweep_jobs("experiment=clip_ablation", "debug=smoke", "seed=0,1")
    assert len(jobs) == 8
    seeds = [o for job in jobs for o in job if o.startswith("seed=")]
    assert sorted(set(seeds)) == ["seed=0", "seed=1"] and len(seeds) == 8
    clips = {tuple(o for o in job if o.startswith("agent.clip.")) for job in jobs}
    assert len(clips) == 4
    assert all("debug=smoke" in job for job in jobs)


def test_job_dir_is_named_by_the_jobs_own_overrides() -> None:
    cfg = hydra_compose("experiment=clip_ablation", "debug=smoke", "launcher=local_parallel", "trainer.resume=auto",
                        "trainer.torch_threads=1", "trainer.progress=false",
                        "agent.clip.actor=null", "agent.clip.critic=10.0", "seed=1")
    # The sweeper's params reach the job as overrides, so they name it; presets and run-only keys do not.
    assert cfg.hydra.job.override_dirname == "agent.clip.actor=null,agent.clip.critic=10.0,seed=1"
    assert cfg.hydra.sweep.subdir == cfg.hydra.job.override_dirname


def test_launcher_presets() -> None:
    cfg = hydra_compose("launcher=local_parallel")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.trainer.torch_threads == 1
    cfg = hydra_compose("launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=8")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb"):
        assert key in cfg.hydra.launcher
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.job.env_set.OMP_NUM_THREADS == "8"
    # a job that reaches its time limit is requeued (hydra's default, 0, would drop it) and warned in time
    assert cfg.hydra.launcher.max_num_timeout >= 1 and cfg.hydra.launcher.signal_delay_s >= 60
    assert hydra_compose().hydra.launcher._target_.endswith("BasicLauncher")  # default: one job after another


def test_ray_preset_without_the_plugin_fails_naming_it() -> None:
    message = missing_launcher_plugin(["-m", "launcher=ray"])
    if message is None:
        pytest.skip("hydra-ray-launcher is installed")
    assert "pip install hydra-ray-launcher" in message
    assert missing_launcher_plugin(["launcher=local_parallel"]) is None
    with pytest.raises(ConfigCompositionException, match="hydra/launcher/ray"):
        hydra_compose("launcher=ray")


def test_optuna_preset_searches_learning_rates_and_clip_limits() -> None:
    cfg = hydra_compose("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"agent.lr.actor", "agent.lr.critic", "agent.clip.actor", "agent.clip.critic"}
    assert cfg.hydra.sweep.dir.endswith("_optuna")


# -------------------------------------------------------------------------------------- skip and report
def test_completed_objective_needs_the_same_config(tmp_path: Path) -> None:
    config = to_config(hydra_compose(hydra=False))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "objective": 4.5}))
    assert completed_objective(config, tmp_path) is None, "no record of the config it completed with"
    record_completed(config, tmp_path)
    assert (tmp_path / COMPLETED_CONFIG).is_file()
    assert completed_objective(config, tmp_path) == 4.5
    threads = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, torch_threads=1))
    assert completed_objective(threads, tmp_path) == 4.5, "trainer.torch_threads does not change the run"
    assert completed_objective(dataclasses.replace(config, seed=3), tmp_path) is None
    fresh = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, resume="none"))
    assert completed_objective(fresh, tmp_path) is None, "trainer.resume=none asks for training"
    (tmp_path / "summary.json").write_text(json.dumps({"status": "stopped", "objective": 1.0}))
    assert completed_objective(config, tmp_path) is None


def test_a_job_completed_before_keys_were_added_or_moved_is_still_skipped(tmp_path: Path) -> None:
    """A rerun of an old finished sweep: the recorded config lacks keys added since (agent.augment, env.view,
    whose values it ran with are rundir.LEGACY_VALUES) and spells moved keys by their old names. Neither is a
    change, so the job is skipped; a real change still trains."""
    config = to_config(hydra_compose("agent.augment=none", "env.view=world", hydra=False))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "objective": 4.5}))
    record_completed(config, tmp_path)
    record = json.loads((tmp_path / COMPLETED_CONFIG).read_text())
    del record["agent"]["augment"], record["env"]["view"], record["env"]["bev"]
    record["env"]["port"] = record["env"]["carla"].pop("port")  # the key's name before env.carla.*
    (tmp_path / COMPLETED_CONFIG).write_text(json.dumps(record))
    assert completed_objective(config, tmp_path) == 4.5
    shifted = dataclasses.replace(config, agent=dataclasses.replace(config.agent, augment="shift"))
    assert completed_objective(shifted, tmp_path) is None, "the old run trained without augmentation"


def test_sweep_summary_reports_every_job_that_did_not_complete(tmp_path: Path, capsys) -> None:
    outcomes = {"a": {"status": "completed", "steps": 10, "total_steps": 10, "objective": 1.0},
                "b": {"status": "stopped", "reason": "non-finite critic loss at env step 5", "steps": 5,
                      "total_steps": 10, "objective": -2.0},
                "c": {"status": "running", "steps": 3, "total_steps": 10, "objective": 0.0},
                "d": None}
    for name, outcome in outcomes.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        if outcome is not None:
            (tmp_path / name / "summary.json").write_text(json.dumps(outcome))
    assert [j.status for j in collect(tmp_path)] == ["completed", "stopped", "running", "no summary"]
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_info.value.code == EXIT_SWEEP_INCOMPLETE
    out = capsys.readouterr().out
    assert "1 of 4 jobs completed; 3 did not" in out
    assert "| b | stopped | 5/10 | non-finite critic loss at env step 5 |" in out
    assert "process was killed" in out and "failed before training started" in out
    record = json.loads((tmp_path / SWEEP_SUMMARY).read_text())
    assert record["completed"] == 1 and record["not_completed"] == ["b", "c", "d"]


def test_sweep_summary_exits_normally_when_all_jobs_completed(tmp_path: Path, capsys) -> None:
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"status": "completed", "objective": 1.0}))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "all 1 jobs completed" in capsys.readouterr().out


def test_a_sweep_with_no_job_folder_fails_and_says_where_jobs_write(tmp_path: Path, capsys) -> None:
    """On a cluster with a relative hydra.sweep.dir the jobs write elsewhere: "all 0 jobs completed" would lie."""
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_info.value.code == EXIT_SWEEP_INCOMPLETE
    assert "no job folder found there" in capsys.readouterr().out


def test_a_job_summary_linked_from_outside_the_sweep_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "outside.json").write_text(json.dumps({"status": "completed", "objective": 1.0}))
    sweep = tmp_path / "sweep"
    (sweep / "a" / ".hydra").mkdir(parents=True)
    (sweep / "a" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (sweep / "a" / "summary.json").symlink_to(tmp_path / "outside.json")
    (job,) = collect(sweep)
    assert job.status == "refused" and "outside" in job.reason


def test_nan_guard_stop_returns_a_finite_objective(tmp_path: Path) -> None:
    from av_td3.app import EXIT_NAN_GUARD, run_job

    cfg = hydra_compose("debug=smoke", *SHORT, ONE_THREAD, "agent.lr.critic=1e30", "monitor.nan_policy=stop",
                        hydra=False)
    objective, code = run_job(cfg, tmp_path / "run")
    assert code == EXIT_NAN_GUARD
    # the worst possible return, not the last evaluation before the divergence: a search must not favour it
    config = to_config(cfg)
    assert objective == -bounds.max_abs_reward(config) * config.env.max_episode_steps
    written = summary(tmp_path / "run")
    assert written["objective"] == objective
    assert written["objective_is"].startswith("penalty, the worst possible return: stopped by the NaN guard: ")


@pytest.mark.parametrize("fields, says", [
    ({"status": "completed", "final_eval": {"return": 3.5}, "objective": 3.5}, "final evaluation return"),
    ({"status": "stopped", "reason": "interrupted by SIGINT", "final_eval": {"return": 3.5}, "objective": 3.5,
      "steps": 150, "total_steps": 300},
     "return of the last evaluation; the run stopped at env step 150 of 300: interrupted by SIGINT"),
    ({"status": "stopped", "reason": "interrupted by SIGINT", "objective": -12400.0},
     "penalty, the worst possible return: no evaluation (the run stopped: interrupted by SIGINT)"),
    ({"status": "failed", "reason": "ValueError: bad", "objective": FAILED_OBJECTIVE},
     "penalty, -1,000,000,000: no evaluation (the run failed: ValueError: bad)"),
    ({"status": "completed", "final_eval": {"return": float("nan")}, "objective": -12400.0},
     "penalty, the worst possible return: the last evaluation's return is not finite"),
    ({}, "not yet set: the run is in progress"),
])
def test_summary_says_what_its_objective_is(tmp_path: Path, fields: dict, says: str) -> None:
    """An interrupted run's -12400.0 is labelled a penalty next to it, not left to pass for a return."""
    write_summary(tmp_path, Summary(**fields))
    written = summary(tmp_path)
    assert written["objective_is"] == says
    keys = list(written)
    assert keys.index("objective_is") == keys.index("objective") + 1  # next to it in the file


def test_a_summary_without_objective_is_is_still_read(tmp_path: Path) -> None:
    """Summaries written before the field existed: the sweep report reads them, objective_is None."""
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"status": "completed", "objective": 1.0}))
    (job,) = collect(tmp_path)
    assert (job.status, job.objective, job.objective_is) == ("completed", 1.0, None)


def test_the_compare_command_names_the_plans_baseline(tmp_path: Path, capsys) -> None:
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"status": "completed", "objective": 1.0}))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                                                     "plan": {"baseline": "arm=td3_noclip"}}))
    assert re.search(rf"compare {re.escape(str(tmp_path))} --baseline arm=td3_noclip\n", capsys.readouterr().out)
    # a failed job: the same command in the report's last paragraph
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"status": "failed", "objective": 1.0}))
    with pytest.raises(SystemExit):
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                                                         "plan": {"baseline": "arm=td3_noclip"}}))
    assert "--baseline arm=td3_noclip` (as diverged)" in capsys.readouterr().out
    assert compare_command(tmp_path).endswith(f"compare {tmp_path}")  # no plan.baseline: no --baseline


def test_the_sweep_folder_is_printed_before_the_first_job(tmp_path: Path) -> None:
    """A real 2-job sweep of tiny runs (~25 s on a loaded 2-core machine): the basic launcher names no folder,
    the callback does, before Hydra launches the first job; the end report's compare command names the plan's
    baseline (plan.baseline on the command line, as an experiment would set it)."""
    sweep_dir = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "debug=smoke", "seed=0,1", "trainer.total_steps=20", "trainer.learning_starts=10",
                  "trainer.eval_every=20", "trainer.log_every=10", "trainer.checkpoint_every=20",
                  "env.max_episode_steps=10", ONE_THREAD, "plan.baseline='seed=0'", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr  # Hydra and the jobs log to either, depending on the logging config
    start = f"Sweep {sweep_dir}: one folder per job in it"
    assert proc.stdout.startswith(start), proc.stdout[:500]
    assert out.count(start) == 1 and "Launching 2 jobs" in out
    assert "--baseline seed=0" in proc.stdout.splitlines()[-1]


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    work = tmp_path_factory.mktemp("ablation")
    command = ["-m", "experiment=clip_ablation", "debug=smoke", "seed=0,1", *SHORT, ONE_THREAD,
               f"hydra.sweep.dir={work / 'sweep'}"]
    proc = launch(work, *command)
    return work / "sweep", proc, command


@pytest.mark.slow
def test_ablation_sweep_runs_every_job_into_its_own_folder(ablation) -> None:
    sweep_dir, proc, _ = ablation
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = {job_name(f"agent.clip.actor={a}", f"agent.clip.critic={c}", f"seed={s}", *SHORT)
                for a, c, s in product(["1.5", "null"], ["200.0", "null"], [0, 1])}
    jobs = {p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()}
    assert jobs == expected
    for name in jobs:
        job = sweep_dir / name
        assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        assert list((job / "tb").glob("events.out.tfevents.*")) and (job / "scalars.csv").is_file()
        assert list((job / "checkpoints").glob("step_*.pt"))
        assert summary(job)["status"] == "completed" and summary(job)["steps"] == 120
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert config.experiment_name == "clip_ablation" and config.trainer.total_steps == 120
    assert json.loads((sweep_dir / SWEEP_SUMMARY).read_text())["completed"] == 8
    assert "all 8 jobs completed" in proc.stdout


@pytest.mark.slow
def test_compare_reads_the_sweep_one_row_per_configuration(ablation) -> None:
    sweep_dir, _, _ = ablation
    proc = subprocess.run([sys.executable, "-m", "av_td3.cli", "compare", str(sweep_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    assert all("2 (2 completed / 0 stopped)" in row for row in rows)
    with open(sweep_dir / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(row["n"] == "2" for row in table)


@pytest.mark.slow
def test_rerun_into_the_same_sweep_dir_skips_completed_jobs(ablation) -> None:
    sweep_dir, first, command = ablation
    assert first.returncode == 0

    def results() -> dict[str, int]:  # every file a job's training writes (not Hydra's .hydra/ nor the log)
        return {str(p): p.stat().st_mtime_ns for p in sweep_dir.glob("*/**/*")
                if p.is_file() and ".hydra" not in p.parts and p.name != "launch.log"}

    before = results()
    assert sum(Path(p).name == "summary.json" for p in before) == 8
    proc = launch(sweep_dir.parent, *command)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("already completed, skipping") == 8
    assert results() == before


@pytest.mark.slow
def test_failed_job_is_reported_and_the_sweep_exits_non_zero(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "debug=smoke", *SHORT, ONE_THREAD, "agent.lr.critic=1e30,3e-4",
                  "monitor.nan_policy=stop", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == EXIT_SWEEP_INCOMPLETE, proc.stdout[-3000:] + proc.stderr[-3000:]
    bad = sweep_dir / job_name("agent.lr.critic=1e+30", "monitor.nan_policy=stop", *SHORT)
    good = sweep_dir / job_name("agent.lr.critic=0.0003", "monitor.nan_policy=stop", *SHORT)
    assert summary(good)["status"] == "completed", "the other job still ran"
    assert summary(bad)["status"] == "stopped" and summary(bad)["nan_guard"]["triggered"]
    assert "1 of 2 jobs completed; 1 did not" in proc.stdout
    assert re.search(rf"\| {re.escape(bad.name)} \| stopped \| \d+/120 \| non-finite", proc.stdout)
    record = json.loads((sweep_dir / SWEEP_SUMMARY).read_text())
    assert record["not_completed"] == [bad.name]
    stopped = next(r for r in record["results"] if r["job"] == bad.name)
    assert math.isfinite(stopped["objective"])


@pytest.mark.slow
def test_single_run_keeps_its_own_exit_status(tmp_path: Path) -> None:
    from av_td3.app import EXIT_NAN_GUARD

    proc = launch(tmp_path, "debug=smoke", *SHORT, ONE_THREAD, "agent.lr.critic=1e30",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == EXIT_NAN_GUARD, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Sweep" not in proc.stdout and not (tmp_path / "run" / SWEEP_SUMMARY).exists()


@pytest.mark.slow
def test_local_parallel_launcher_runs_two_jobs_at_once(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "launcher=local_parallel", "debug=smoke", *SHORT, "seed=0,1",
                  f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = [sweep_dir / job_name(f"seed={s}", *SHORT) for s in (0, 1)]
    # Each job writes .hydra/config.yaml as it starts and summary.json last: the two spans overlap.
    spans = [((j / ".hydra" / "config.yaml").stat().st_mtime, (j / "summary.json").stat().st_mtime) for j in jobs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    for job in jobs:
        assert summary(job)["status"] == "completed"
        assert OmegaConf.load(job / ".hydra" / "config.yaml").trainer.torch_threads == 1


@pytest.mark.slow
def test_optuna_search_gets_finite_objectives(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = launch(tmp_path, "-m", "hparams_search=optuna", "debug=smoke", *SHORT, ONE_THREAD,
                  "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = [p for p in sweep_dir.iterdir() if (p / "summary.json").is_file()]
    assert len(jobs) == 2
    assert all(math.isfinite(summary(j)["objective"]) for j in jobs)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"])
    assert results["best_value"] == max(summary(j)["objective"] for j in jobs)
    assert set(results["best_params"]) == {"agent.lr.actor", "agent.lr.critic", "agent.clip.actor",
                                           "agent.clip.critic"}
