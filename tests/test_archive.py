"""``av-td3 archive``: finished runs kept small and complete enough that ``compare`` and ``validate`` read them
exactly as the run folders they came from, pooled across folders, with older configs read as they ran."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from av_td3 import rundir
from av_td3.analysis.compare import group_runs
from av_td3.analysis.runs import find_runs
from av_td3.analysis.validate import check_run
from av_td3.cli import main
from tests.analysis_fixtures import healthy_scalars, make_config, write_run, write_sweep

UNCLIPPED = ["agent.clip.actor=null", "agent.clip.critic=null"]


def _study(root: Path) -> Path:
    sweep = write_sweep(root / "sweep", [([], 0), ([], 1), (UNCLIPPED, 0), (UNCLIPPED, 1)],
                        summary={"provenance": {"git_commit": "abc123"}})
    write_run(sweep / "seed=7", [], 7, summary={"status": "running", "final_eval": None}, stale=True)
    return sweep


def test_archive_keeps_what_compare_needs_and_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = _study(tmp_path)
    (sweep / "seed=0" / "checkpoints").mkdir()
    (sweep / "seed=0" / "checkpoints" / "ckpt_300.pt").write_bytes(b"x" * 10_000)
    dest = tmp_path / "results" / "study" / "monday"
    assert main(["archive", str(sweep), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "skipped seed=7: crashed; only finished runs" in out and "4 run(s) archived" in out
    run = dest / "seed=0"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == [
        ".hydra/config.yaml", ".hydra/overrides.yaml", "archive.json", "scalars.csv.gz", "summary.json"]
    assert sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) < 1_000_000
    record = json.loads((run / "archive.json").read_text())
    assert record["code_version"] == "abc123" and record["source"] == str((sweep / "seed=0").resolve())
    # every scalar survives, grad/alert/eval tags included
    live, kept = find_runs(sweep / "seed=0")[0].scalars, find_runs(run)[0].scalars
    pd.testing.assert_frame_equal(live.reset_index(drop=True), kept.reset_index(drop=True), check_dtype=False)
    # archiving again gives the same bytes (no spurious diff in git)
    before = (run / "scalars.csv.gz").read_bytes()
    assert main(["archive", str(sweep), str(dest)]) == 0
    assert (run / "scalars.csv.gz").read_bytes() == before


def test_compare_and_validate_read_an_archive_like_the_runs(tmp_path: Path) -> None:
    sweep = _study(tmp_path)
    dest = tmp_path / "archive"
    assert main(["archive", str(sweep), str(dest)]) == 0
    assert main(["compare", str(sweep), "--out", str(tmp_path / "live")]) == 0
    assert main(["compare", str(dest), "--out", str(tmp_path / "kept")]) == 0
    live = pd.read_csv(tmp_path / "live" / "comparison.csv").set_index("group")
    kept = pd.read_csv(tmp_path / "kept" / "comparison.csv").set_index("group")
    # the live sweep also holds the crashed run; everything about the finished ones is the same
    assert live.loc["default", "incomplete"] == 1 and kept.loc["default", "incomplete"] == 0
    cols = [c for c in live.columns if c not in ("runs", "incomplete")]
    pd.testing.assert_frame_equal(live[cols], kept[cols])
    assert all(check_run(r).ok for r in find_runs(dest))


def test_compare_pools_archives_from_several_sittings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_sweep(tmp_path / "mon", [([], 0), (UNCLIPPED, 0)])
    write_sweep(tmp_path / "tue", [([], 1), (UNCLIPPED, 1), ([], 2), (UNCLIPPED, 2)])
    for day in ("mon", "tue"):
        assert main(["archive", str(tmp_path / day), str(tmp_path / "results" / day)]) == 0
    assert main(["compare", str(tmp_path / "results"), "--out", str(tmp_path / "out")]) == 0
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("group")
    assert csv.loc["default", "runs"] == 3 and csv.loc["agent.clip.actor=null,agent.clip.critic=null", "runs"] == 3
    # the seeds of both sittings pool, so the groups hold the same seeds (the pairing P(improvement) uses)
    unclipped = "agent.clip.actor=null,agent.clip.critic=null"
    assert csv.loc["default", "seeds"] == csv.loc[unclipped, "seeds"] == "[0, 1, 2]"
    assert bool(csv.loc[unclipped, "p_paired"])


def test_archive_refuses_to_overwrite_another_runs_archive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_sweep(tmp_path / "a", [([], 0)])
    write_sweep(tmp_path / "b", [([], 0)])  # same job name, another run
    assert main(["archive", str(tmp_path / "a"), str(tmp_path / "dest")]) == 0
    assert main(["archive", str(tmp_path / "b"), str(tmp_path / "dest")]) == 1
    assert "already holds the run archived from" in capsys.readouterr().out
    assert main(["archive", str(tmp_path / "a"), str(tmp_path / "a" / "inside")]) == 2


def test_a_run_stopped_resumably_is_not_archived_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run a signal stopped halfway is unfinished (resume it), unlike a stop by the NaN guard, which is a result:
    archive skips it, naming the step and the way on, unless --resumable-stops."""
    stop = {"status": "stopped", "steps": 3517, "total_steps": 15000, "reason": "interrupted by SIGTERM",
            "nan_guard": {"triggered": False, "quantity": None, "step": None}}
    guard = {**stop, "reason": "non-finite critic loss at env step 1027", "steps": 1027,
             "nan_guard": {"triggered": True, "quantity": "critic loss", "step": 1027}}
    write_run(tmp_path / "sweep" / "signal", [], 0, summary=stop)
    write_run(tmp_path / "sweep" / "guard", [], 1, summary=guard)
    dest = tmp_path / "results" / "study" / "x"
    assert main(["archive", str(tmp_path / "sweep"), str(dest)]) == 0
    out = capsys.readouterr().out
    assert ("skipped signal: stopped at step 3517 of 15000 (interrupted by SIGTERM), not at its end: resume it"
            in out) and "--resumable-stops" in out
    assert (dest / "guard").is_dir() and not (dest / "signal").exists()
    assert main(["archive", str(tmp_path / "sweep"), str(dest), "--resumable-stops"]) == 0
    assert (dest / "signal" / "summary.json").is_file()


def test_an_older_config_is_read_with_the_values_it_ran_with(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", [], 0)
    config = (run / rundir.CONFIG_FILE).read_text()
    (run / rundir.CONFIG_FILE).write_text(re.sub(r"(?m)^ *(mode: norm|collapse_fraction: 0.5)\n", "", config))
    assert "mode:" not in (run / rundir.CONFIG_FILE).read_text()
    cfg = find_runs(run)[0].config
    assert cfg.agent.clip.mode == "norm"  # LEGACY_VALUES: what runs did before the key existed
    assert cfg.monitor.collapse_fraction == 0.5  # an analysis key: today's default


def test_a_run_with_retired_alert_keys_pools_with_newer_runs(tmp_path: Path) -> None:
    old = write_run(tmp_path / "old", [], 0)
    config = (old / rundir.CONFIG_FILE).read_text()
    (old / rundir.CONFIG_FILE).write_text(config.replace("monitor:\n", "monitor:\n  warn_factor: 10.0\n  "
                                                         "critical_factor: 100.0\n", 1))
    write_run(tmp_path / "new", [], 1)
    assert "warn_factor" in (old / rundir.CONFIG_FILE).read_text()
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert [len(g.runs) for g in groups] == [2] and warnings == []


def test_readers_refuse_a_symlink_out_of_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    outside = write_run(tmp_path / "elsewhere", [], 0)
    run = write_run(tmp_path / "study" / "run", [], 0)
    (run / "summary.json").unlink()
    os.symlink(outside / "summary.json", run / "summary.json")
    for command in (["validate", str(tmp_path / "study")], ["compare", str(tmp_path / "study")],
                    ["archive", str(tmp_path / "study"), str(tmp_path / "dest")]):
        assert main(command) == 2
        assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_scalars_file_follows_logger_csv_filename(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [], 0, events=False, csv=True)
    (run / "scalars.csv").rename(run / "metrics.csv")
    config = (run / rundir.CONFIG_FILE).read_text()
    assert "  csv: null\n" in config
    (run / rundir.CONFIG_FILE).write_text(config.replace("  csv: null\n", "  csv:\n    filename: metrics.csv\n"))
    found = find_runs(run)[0]
    assert found.scalars_file == run / "metrics.csv"
    assert len(found.scalars) == sum(len(v) for v in healthy_scalars(make_config()).values())


def _as_before_env_carla(run: Path) -> None:
    """Rewrite a run's config as runs wrote it before the CARLA keys moved under env.carla (flat env.host, ...)
    and before the keys that came with the move (the rule penalties, env.carla.traffic_light) existed."""
    cfg = OmegaConf.load(run / rundir.CONFIG_FILE)
    carla = cfg.env.pop("carla")
    carla.pop("traffic_light")
    for key, value in carla.items():
        cfg.env[key] = value
    for rule in ("route_deviation", "wrong_way", "blocked", "red_light"):
        cfg.env.reward.pop(f"{rule}_penalty")
    (run / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))


def test_a_run_from_before_env_carla_groups_with_a_new_run_of_the_same_configuration(tmp_path: Path) -> None:
    """Old flat keys (env.host, env.port, env.camera.x, ...) are read as env.carla.*: an old and a new CARLA run of
    one configuration are one group, and an old run that changed a moved key is apart, under the new name. (On the
    highway backend env.carla.* is never read, so there it would not split a group: test_compare.)"""
    carla = ["env.name=carla"]
    for name, overrides, seed in (("old", [], 0), ("old_port", ["env.port=2004"], 0)):
        run = write_run(tmp_path / name, carla, seed)
        _as_before_env_carla(run)
        if overrides:
            (run / rundir.CONFIG_FILE).write_text((run / rundir.CONFIG_FILE).read_text().replace(
                "  port: 2000\n", "  port: 2004\n"))
            (run / rundir.OVERRIDES_FILE).write_text(
                OmegaConf.to_yaml(OmegaConf.create([*carla, *overrides, "seed=0"])))
    write_run(tmp_path / "new", carla, 1)
    write_run(tmp_path / "new_port", [*carla, "env.carla.port=2004"], 1)
    old = (tmp_path / "old" / rundir.CONFIG_FILE).read_text()
    assert "carla:" not in old and "  host: localhost\n" in old and "  camera:\n" in old
    cfg = find_runs(tmp_path / "old")[0].config
    assert cfg.env.carla.host == "localhost" and cfg.env.carla.camera.x == 1.5 and "host" not in cfg.env
    groups, warnings, _ = group_runs(find_runs(tmp_path))
    assert sorted(len(g.runs) for g in groups) == [2, 2] and warnings == []
    ports = {g.label: sorted(r.config.env.carla.port for r in g.runs) for g in groups}
    # the old run's recorded override is read under the new name too, so the group's label is one
    assert ports == {"default": [2000, 2000], "env.carla.port=2004": [2004, 2004]}, ports


def test_archived_runs_in_results_read_their_carla_keys_under_env_carla() -> None:
    """The committed archive (written with the flat keys) reads under today's names."""
    root = Path(__file__).resolve().parent.parent / "results"
    configs = sorted(root.rglob(rundir.CONFIG_FILE))
    if not configs:
        pytest.skip("no archived runs in this checkout")
    flat = [c for c in configs if "\n  host:" in c.read_text()]  # written before the move
    if not flat:
        pytest.skip("no archived run in this checkout predates env.carla")
    for config in (flat[0], configs[-1]):  # one written before the move, and the newest in sort order
        cfg = rundir.read_config(config.parent.parent)
        assert cfg.env.carla.host == "localhost" and "host" not in cfg.env and "fixed_delta_s" not in cfg.env


def test_archiving_a_smoke_run_into_a_study_of_full_runs_warns(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "results" / "study"
    write_sweep(tmp_path / "full", [([], 0), (UNCLIPPED, 0)])  # the arms vary the clip keys: not a warning
    assert main(["archive", str(tmp_path / "full"), str(study / "full")]) == 0
    assert "warning" not in capsys.readouterr().out
    write_sweep(tmp_path / "more", [(UNCLIPPED, 1)])
    assert main(["archive", str(tmp_path / "more"), str(study / "more")]) == 0
    assert "warning" not in capsys.readouterr().out
    write_sweep(tmp_path / "smoke", [(["debug=smoke", "trainer.total_steps=300"], 2)])
    assert main(["archive", str(tmp_path / "smoke"), str(study / "smoke")]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "launched with debug=smoke (none of them was)" in out
