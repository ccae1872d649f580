"""End to end: `python launch.py ... debug=smoke` trains, writes what it promises, and passes the validator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from av_td3.analysis.events import read_event_files, read_scalars_csv
from av_td3.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent

TAGS = ["train/critic_loss", "train/actor_loss", "train/q1", "train/q2", "episode/return", "episode/length",
        "episode/collisions", "episode/lane_invasions", "episode/reward_efficiency", "episode/reward_lane_keeping",
        "episode/reward_comfort", "episode/reward_safety", "episode/reward_progress", "eval/return",
        "eval/success_rate", "eval/collisions", "perf/steps_per_s",
        # agent.encoder=shared (the default): the actor has no CNN of its own, so no grad/actor/cnn tags
        *(f"grad/{net}/{part}/{kind}"
          for net, parts in (("actor", ("mlp", "total")), ("critic", ("cnn", "mlp", "total"))) for part in parts
          for kind in ("before_clip", "before_clip_max", "after_clip", "after_clip_max")),
        *(f"grad/{net}/{k}" for net in ("actor", "critic") for k in (
            "clip_coef", "clip_fraction", "updates", "spikes", "clip_limit", "after_over_limit_max",
            "total/before_clip_p50", "total/before_clip_p90", "total/before_clip_p99")),
        "alert/critic/clip_violation", "alert/actor/grad_spike"]


def launch(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path, float]:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SDL_VIDEODRIVER", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, run_dir, time.perf_counter() - start


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, float]:
    return launch(tmp_path_factory.mktemp("smoke"), "agent.clip.actor=1.0", "env.npcs=20", "debug=smoke")


def test_smoke_run_exits_zero_and_writes_everything(smoke_run) -> None:
    proc, run_dir, wall = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "scalars.csv").exists()
    assert list((run_dir / "checkpoints").glob("step_*.pt")) and (run_dir / "checkpoints" / "latest").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert "bytes per transition" in (run_dir / "launch.log").read_text()
    print(f"smoke run wall time: {wall:.1f} s")


def test_smoke_run_logs_the_tag_schema_with_working_clipping(smoke_run) -> None:
    _, run_dir, _ = smoke_run
    df = read_event_files(sorted((run_dir / "tb").glob("events.out.tfevents.*")))
    tags = set(df["tag"])
    missing = [t for t in TAGS if t not in tags]
    assert not missing, missing
    assert not [t for t in tags if t.startswith("grad/actor/cnn/")], "zeros logged for a CNN the actor lacks"
    last = lambda tag: df[df.tag == tag]["value"]  # noqa: E731
    assert last("grad/actor/total/after_clip_max").max() <= 1.0 * (1 + 1e-4)
    assert last("grad/critic/total/after_clip_max").max() <= 200.0 * (1 + 1e-4)  # the default limit
    actor, critic = last("grad/actor/updates").sum(), last("grad/critic/updates").sum()
    assert critic >= 100
    assert abs(actor - critic / 2) <= 1
    steps = df[df.tag == "train/critic_loss"]["step"]
    assert steps.is_monotonic_increasing and steps.is_unique


def test_validator_passes_on_the_smoke_run(smoke_run, capsys) -> None:
    _, run_dir, _ = smoke_run
    assert cli(["validate", str(run_dir)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_unclipped_actor_logs_after_equal_to_before(tmp_path: Path) -> None:
    proc, run_dir, _ = launch(tmp_path, "agent.clip.actor=null", "debug=smoke", "trainer.total_steps=160",
                              "logger=[csv]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = read_scalars_csv(run_dir / "scalars.csv")
    for part in ("mlp", "total"):  # the default shared encoder: the actor has no CNN part
        before = df[df.tag == f"grad/actor/{part}/before_clip"]["value"].to_numpy()
        after = df[df.tag == f"grad/actor/{part}/after_clip"]["value"].to_numpy()
        assert len(before) > 0 and (before == after).all()
    assert (df[df.tag == "grad/actor/clip_fraction"]["value"] == 0).all()


def test_nan_guard_stops_a_diverging_run_with_a_checkpoint(tmp_path: Path) -> None:
    proc, run_dir, _ = launch(tmp_path, "debug=smoke", "agent.lr.critic=1e30", "agent.clip.critic=null",
                              "trainer.total_steps=200", "logger=[csv]")
    # Adam steps of ~1e30 per weight push Q past float32's range within a few updates: the guard must act
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["nan_guard"]["triggered"]
    assert "non-finite" in proc.stderr + proc.stdout
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
    assert math.isfinite(summary["objective"])
