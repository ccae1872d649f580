"""The run folder's vocabulary is rundir's: names, statuses, summary.json, finding runs, run-only keys, the one
atomic write; and the one walker of a config's values (av_td3.config.tree)."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from av_td3 import rundir
from av_td3.config import Config, CsvConfig, EnvConfig, LoggerConfig, to_config
from av_td3.config.tree import flatten, schema_fields

ROOT = Path(__file__).resolve().parent.parent
# Every module that may touch a run folder, rundir itself aside.
SOURCES = [p for p in (ROOT / "av_td3").rglob("*.py") if p.name != "rundir.py"] + [ROOT / "launch.py",
                                                                                    *(ROOT / "scripts").glob("*.py")]
FILE_NAMES = {rundir.SUMMARY_FILE, rundir.TB_DIR, rundir.CHECKPOINT_DIR, rundir.HYDRA_DIR, rundir.LAUNCH_LOG,
              rundir.COMPLETED_CONFIG, rundir.SWEEP_SUMMARY, rundir.ARCHIVE_FILE, rundir.ARCHIVED_SCALARS_FILE,
              rundir.CONFIG_FILE, rundir.OVERRIDES_FILE}


def _literals(path: Path) -> list[tuple[ast.AST, str]]:
    return [(node, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_run_folder_names_are_spelled_only_in_rundir() -> None:
    """A file or folder name of a run folder appears as a string literal nowhere but in rundir (messages name them
    through the constants too). same_behaviour.py is the exception: it must read the base commit's folders too."""
    found = [f"{p.relative_to(ROOT)}:{node.lineno}: {text!r}" for p in SOURCES if p.name != "same_behaviour.py"
             for node, text in _literals(p) if text in FILE_NAMES]
    assert found == []


def test_statuses_are_compared_and_set_through_rundir_constants() -> None:
    """No module compares a status with, or sets one to, a literal: ``status == "stopped"`` reads rundir.STOPPED."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            sides = ([node.left, *node.comparators] if isinstance(node, ast.Compare)
                     else [node.value] if isinstance(node, ast.Assign) and any(
                         isinstance(t, ast.Attribute) and t.attr == "status" for t in node.targets) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for side in sides
                      if isinstance(side, ast.Constant) and side.value in rundir.STATUSES]
    assert found == []


def test_the_sweep_finds_and_reads_jobs_without_importing_the_analysis(tmp_path: Path) -> None:
    job = tmp_path / "seed=1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 1\n")
    rundir.write_summary(job, rundir.Summary(status=rundir.COMPLETED, steps=3, total_steps=3))
    code = ("import sys; from pathlib import Path; from av_td3 import sweep; "
            f"jobs = sweep.collect(Path({str(tmp_path)!r})); print([(j.job, j.status) for j in jobs]); "
            "print(sorted(m for m in sys.modules if m.startswith('av_td3.analysis') or m == 'pandas'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[('seed=1', 'completed')]", "[]"]


def test_find_run_dirs_stops_at_a_run_and_skips_hidden_folders(tmp_path: Path) -> None:
    for d in ("a", "b/c", "a/checkpoints/nested", ".hidden/d"):
        (tmp_path / d / ".hydra").mkdir(parents=True)
        (tmp_path / d / rundir.CONFIG_FILE).write_text("seed: 0\n")
    assert rundir.find_run_dirs(tmp_path) == [tmp_path / "a", tmp_path / "b" / "c"]


def test_summary_json_is_read_back_through_rundir(tmp_path: Path) -> None:
    assert rundir.read_summary(tmp_path) is None
    (tmp_path / rundir.SUMMARY_FILE).write_text('{"status": "compl')  # cut short by a killed process
    assert rundir.read_summary(tmp_path) is None
    rundir.write_summary(tmp_path, rundir.Summary(status=rundir.STOPPED, steps=7, reason="SIGTERM"))
    summary = rundir.read_summary(tmp_path)
    assert summary is not None and summary["status"] == rundir.STOPPED and summary["steps"] == 7
    assert rundir.is_resumable_stop(summary)
    assert not rundir.is_resumable_stop({**summary, "nan_guard": {"triggered": True}})
    assert not rundir.is_resumable_stop({**summary, "status": rundir.COMPLETED})


@pytest.mark.parametrize("durable", [True, False])
def test_the_atomic_write_syncs_the_directory_only_when_durable(tmp_path: Path, monkeypatch, durable: bool) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(rundir, "_fsync_dir", synced.append)
    rundir.atomic_write_bytes(tmp_path / "f", lambda f: f.write(b"x"), durable=durable)
    assert (tmp_path / "f").read_bytes() == b"x" and synced == ([tmp_path] if durable else [])
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_summary_json_and_checkpoints_are_written_durably(tmp_path: Path, monkeypatch) -> None:
    from av_td3.checkpoint import CheckpointManager

    synced: list[Path] = []
    monkeypatch.setattr(rundir, "_fsync_dir", synced.append)
    rundir.write_summary(tmp_path, rundir.Summary())
    CheckpointManager(tmp_path / rundir.CHECKPOINT_DIR, keep=1).save({"step": 1}, 1)
    assert synced == [tmp_path, tmp_path / rundir.CHECKPOINT_DIR, tmp_path / rundir.CHECKPOINT_DIR]


def test_a_port_claim_is_written_privately_through_the_one_atomic_write(tmp_path: Path, monkeypatch) -> None:
    from av_td3.envs.carla import ports

    monkeypatch.setattr(ports.tempfile, "gettempdir", lambda: str(tmp_path))
    calls: list[dict] = []
    real = rundir.atomic_write_bytes
    monkeypatch.setattr(ports, "atomic_write_bytes", lambda *a, **k: (calls.append(k), real(*a, **k)))
    path = ports.claim_port("127.0.0.1_2000", "CARLA server")
    assert calls == [{"durable": False, "private": True}]
    assert path.read_text() == str(os.getpid()) and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    ports.release_port(path)


# ----------------------------------------------------------------------------------------------- run-only keys
RUN_ONLY_VALUES = {"trainer.resume": "none", "trainer.torch_threads": 3, "trainer.progress": False,
                   "trainer.trust_checkpoint": True}


def test_every_run_only_key_is_ignored_by_the_skip_check_the_resume_hint_and_compare(tmp_path: Path) -> None:
    """rundir.RUN_ONLY_KEYS is the one list: the sweep's skip check, launch.py's pointer to an interrupted run and
    compare's group labels all leave each of its keys out (conf/config.yaml's exclude_keys: test_configs.py)."""
    from av_td3.analysis.compare import _override_items
    from av_td3.sweep import completed_objective, record_completed

    assert set(RUN_ONLY_VALUES) == rundir.RUN_ONLY_KEYS
    config = to_config(Config(logger=LoggerConfig(csv=CsvConfig())))  # validated, as the job runner's
    rundir.write_summary(tmp_path, rundir.Summary(status=rundir.COMPLETED, objective=2.5, final_eval={"return": 2.5}))
    record_completed(config, tmp_path)
    run = tmp_path / "runs" / "2026-12-07" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / rundir.OVERRIDES_FILE).write_text("- debug=smoke\n")
    rundir.write_summary(run, rundir.Summary(status=rundir.STOPPED, steps=5))
    for key, value in RUN_ONLY_VALUES.items():
        section, leaf = key.split(".")
        changed = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section),
                                                                              **{leaf: value})})
        if key != "trainer.resume":  # resume=none asks for training by design; its value is not what is compared
            assert completed_objective(changed, tmp_path) == 2.5, key
        override = f"{key}={value}"
        assert rundir.interrupted_run(tmp_path / "runs", ["debug=smoke", override]) == (run, 5), key
        assert _override_items([override, "agent.gamma=0.9"], flatten(changed)) == [
            f"agent.gamma={changed.agent.gamma}"], key  # the value as the run's config holds it


# ----------------------------------------------------------------------------------------------- config walkers
def test_one_walker_of_values_reads_instances_mappings_and_dictconfigs_alike() -> None:
    from omegaconf import OmegaConf

    config = Config()
    flat = flatten(config)
    assert flat == flatten(dataclasses.asdict(config)) == flatten(OmegaConf.structured(config))
    assert flat["agent.clip.actor"] == config.agent.clip.actor and "agent.clip" not in flat
    assert flatten({"logger": {"csv": {}}}) == {"logger.csv": {}}, "an empty mapping is a value of its own"


def test_the_walker_of_types_names_every_value_key_and_its_sections() -> None:
    keys = {f.key for f in schema_fields(Config)}
    sections = {f.key for f in schema_fields(Config) if dataclasses.is_dataclass(f.type)}
    values = set(flatten(Config()))
    null = {k for k in values if k in sections}  # an optional section left null (logger.wandb: null) is a value
    assert "logger.wandb" in null and values <= keys
    assert values - null == {k for k in keys - sections if not k.startswith(tuple(f"{n}." for n in null))}
    assert {"agent", "agent.clip", "env.carla"} <= sections


def test_validation_checks_nested_fields_through_the_walkers() -> None:
    from av_td3.config import ConfigError, validate

    bad = dataclasses.replace(Config(), env=EnvConfig(carla=dataclasses.replace(EnvConfig().carla, port=0)))
    with pytest.raises(ConfigError, match="env.carla.port"):
        validate(bad)
