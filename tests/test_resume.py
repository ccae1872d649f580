"""Crash safety: SIGKILL then rerun resumes exactly; SIGTERM checkpoints and exits cleanly; bad checkpoints."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from av_td3.analysis.events import find_event_files, read_event_files, read_scalars_csv
from av_td3.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
ARGS = ("debug=smoke", "deterministic=true", "trainer.total_steps=240", "trainer.checkpoint_every=80",
        "trainer.eval_every=120", "trainer.log_every=40", "env.max_episode_steps=40")


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *ARGS, *extra, f"hydra.run.dir={run_dir}"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_and_signal_after_first_checkpoint(run_dir: Path, sig: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(command(run_dir, *extra), cwd=run_dir.parent, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait(timeout=120)
    return proc


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    state, _ = CheckpointManager(run_dir / "checkpoints", 2).load_latest()
    assert state["step"] == 240
    return {f"{net}.{k}": v for net in ("actor", "critic", "actor_target", "critic_target")
            for k, v in state["agent"][net].items()}


@pytest.mark.slow
# The modes whose state a checkpoint must carry, end to end through a killed process: AutoClip's window (with SGD's
# momentum buffers in the same run) and ZClip's EMA statistics; norm and AGC keep no clip state (their in-process
# state round trip: tests/test_clipping.py). Three runs a case, so each case is ~1-2 min of CI.
@pytest.mark.parametrize("extra", [(), ("agent.clip.mode=adaptive", "agent.clip.warmup=5", "agent.clip.window=50",
                                        "agent.optimizer=sgd", "agent.lr.actor=0.001", "agent.lr.critic=0.001"),
                                   ("agent.clip.mode=zscore", "agent.clip.warmup=5")],
                         ids=["norm", "adaptive_sgd", "zscore"])
def test_sigkill_then_rerun_resumes_to_the_same_parameters(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Also with the adaptive clip modes, whose statistics must come back from the checkpoint, and SGD."""
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(command(reference, *extra), cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "killed"
    killed = start_and_signal_after_first_checkpoint(run_dir, signal.SIGKILL, *extra)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"

    rerun = subprocess.run(command(run_dir, *extra), cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr + rerun.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 240

    # no duplicated or missing steps in either scalar store, and the same history shape as the uninterrupted run
    def csv_store(d: Path):
        return read_scalars_csv(d / "scalars.csv")

    def event_store(d: Path):
        return read_event_files(find_event_files(d))

    for load in (csv_store, event_store):
        resumed, ref = load(run_dir), load(reference)
        for tag in ("perf/steps_per_s", "grad/critic/updates", "eval/return", "train/critic_loss"):
            steps = list(resumed[resumed.tag == tag]["step"])
            assert steps == list(ref[ref.tag == tag]["step"]), tag
    csv_rows = (run_dir / "scalars.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == len(set(csv_rows)), "a step logged twice"

    # with the buffer checkpointed and deterministic settings, the resumed run ends where the uninterrupted one does
    a, b = final_params(reference), final_params(run_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start_and_signal_after_first_checkpoint(run_dir, signal.SIGTERM)
    out = proc.stdout.read() + proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in out and "rerun the same command to resume" in out
    assert "Traceback" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and "SIGTERM" in summary["reason"]
    state, _ = CheckpointManager(run_dir / "checkpoints", 2).load_latest()
    assert state["step"] == summary["steps"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, caplog) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"step": 1}, 1)
    newest = mgr.save({"step": 2}, 2)
    newest.write_bytes(b"garbage")
    state, path = mgr.load_latest()
    assert state["step"] == 1 and path.name == "step_0000000001.pt"
    assert "cannot be read" in caplog.text


def test_checkpoints_keep_the_last_k_and_leave_no_temporary_files(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in range(5):
        mgr.save({"step": step}, step)
    assert [p.name for p in mgr.all()] == ["step_0000000003.pt", "step_0000000004.pt"]
    assert (tmp_path / "latest").read_text() == "step_0000000004.pt"
    assert not list(tmp_path.glob(".*tmp"))


def test_incompatible_checkpoint_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.run(command(run_dir, "trainer.total_steps=120"), cwd=tmp_path, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(command(run_dir, "trainer.total_steps=200", "env.image.height=40"), cwd=tmp_path,
                           env=env(), capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 2
    assert "different configuration" in out and "image" in out and "Traceback" not in out
    # the failed attempt's summary replaces the completed one: .hydra/config.yaml now describes the failed attempt
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "different configuration" in summary["reason"]


def _checkpoint_and_agent(*overrides: str):
    """A checkpoint's state as the trainer writes it (compat, agent, RNGs) for a small TD3 under ``overrides``,
    and a fresh agent of that configuration."""
    import numpy as np

    from av_td3.agent.td3 import TD3
    from av_td3.train import resume
    from tests.test_config import load
    from tests.test_td3 import SPEC, make_batch

    cfg = load(*overrides, "agent.features_dim=16", "agent.hidden_dim=32")
    agent = TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), q_bound=1e9, seed=0)
    agent.update(make_batch(0), step=0)
    rng = np.random.default_rng(0)
    state = {"compat": resume.compat(cfg, SPEC), "agent": agent.state_dict(), "rng": resume.rng_state(rng)}
    return state, resume.compat(cfg, SPEC), TD3(cfg.agent, cfg.monitor, SPEC, torch.device("cpu"), 1e9, seed=0)


@pytest.mark.parametrize("saved, resumed, named", [
    (("agent.clip.mode=zscore",), ("agent.clip.mode=agc",), "agent.clip.mode: checkpoint 'zscore' vs config 'agc'"),
    (("agent.clip.mode=norm",), ("agent.clip.mode=agc",), "agent.clip.mode: checkpoint 'norm' vs config 'agc'"),
    ((), ("agent.optimizer=sgd",), "agent.optimizer: checkpoint 'adam' vs config 'sgd'"),
])
def test_resume_refuses_another_clip_mode_or_optimizer(tmp_path: Path, saved, resumed, named: str) -> None:
    """The checkpoint's clip and optimizer state would not fit (or would silently mean something else)."""
    import numpy as np

    from av_td3.checkpoint import CheckpointError
    from av_td3.train import resume

    state, _, _ = _checkpoint_and_agent(*saved)
    _, want, agent = _checkpoint_and_agent(*resumed)
    with pytest.raises(CheckpointError) as err:
        resume.restore(state, tmp_path / "step.pt", want, agent, None, np.random.default_rng(0))
    assert named in str(err.value) and "trainer.resume=none" in str(err.value)


def test_a_checkpoint_from_before_the_clip_mode_was_recorded_resumes_when_its_state_fits(tmp_path: Path) -> None:
    """Checkpoints written until 2026-12-06 lack agent.optimizer and agent.clip.mode in their compat and keep the
    clip state in the monitor's: they resume when that state fits, and are refused naming the key when not."""
    import numpy as np

    from av_td3.config import ConfigError
    from av_td3.train import resume

    def old(state: dict) -> dict:
        compat = {k: v for k, v in state["compat"].items() if k not in ("agent.optimizer", "agent.clip.mode")}
        agent = dict(state["agent"])
        agent["monitor"] = {**agent["monitor"], "clip": agent.pop("clip")}
        return {**state, "compat": compat, "agent": agent}

    state, want, agent = _checkpoint_and_agent("agent.clip.mode=zscore")
    resume.restore(old(state), tmp_path / "step.pt", want, agent, None, np.random.default_rng(0))
    state, _, _ = _checkpoint_and_agent("agent.clip.mode=adaptive")
    _, want, agent = _checkpoint_and_agent("agent.clip.mode=zscore")
    with pytest.raises(ConfigError, match="agent.clip.mode=zscore.*trainer.resume=none"):
        resume.restore(old(state), tmp_path / "step.pt", want, agent, None, np.random.default_rng(0))


def submitit_task(launcher: subprocess.Popen) -> psutil.Process:
    """The process submitit_local runs the job in (python -m submitit.core._submit), below the launcher."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if "submitit.core._submit" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no submitit task process under the launcher")


@pytest.mark.slow
def test_preempted_submitit_job_checkpoints_requeues_and_resumes(tmp_path: Path) -> None:
    """What a cluster does to a job: submitit_local runs it like SLURM would, the test sends the job the signal
    SLURM sends before preemption (USR2); the job must checkpoint where it is, be requeued by submitit, resume
    from that checkpoint and finish with the requested steps, logging no step twice."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", "hydra/launcher=submitit_local", *ARGS,
           "trainer.total_steps=400", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while not list(sweep.glob("*/checkpoints/latest")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    (job_dir,) = [p.parent.parent for p in sweep.glob("*/checkpoints/latest")]
    submitit_task(proc).send_signal(signal.SIGUSR2)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]

    log_text = (job_dir / "launch.log").read_text()
    assert "preempted: the cluster launcher sent SIGUSR2" in log_text, log_text[-3000:]
    preempted_at = int(re.search(r"SIGUSR2 at env step (\d+)", log_text).group(1))
    assert f"at env step {preempted_at} (episode" in log_text  # the requeued job resumed right there
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 400
    csv_rows = (job_dir / "scalars.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == len(set(csv_rows)), "a step logged twice"
    state, _ = CheckpointManager(job_dir / "checkpoints", 2).load_latest()
    assert state["step"] == 400


def test_output_dir_under_a_file_is_refused_before_hydra(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    done = subprocess.run(command(blocker / "run"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert f"{blocker} is a file, not a directory" in done.stderr and "hydra.run.dir=PATH" in done.stderr
    assert "Traceback" not in done.stderr


def test_unwritable_output_dir_is_named_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    from av_td3.config import ConfigError, check_output_dir

    check_output_dir([f"hydra.sweep.dir={tmp_path}/sweep/${{now:%H}}", "-m"])  # writable: no error
    # Permissions do not bind root (CI may run as root), so the unwritable dir is simulated at os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=rf"hydra.sweep.dir=.*: {tmp_path} is not writable.*hydra.sweep.dir=PATH"):
        check_output_dir(["-m", f"hydra.sweep.dir={tmp_path}/sweep/${{now:%H}}"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"hydra.run.dir=outputs: .* is not writable"):
        check_output_dir(["debug=smoke"])  # the default outputs/ under the current dir


def _limit_file_size() -> None:
    """A disk that fills up after 300 kB: writes past it fail with EFBIG, as they fail with ENOSPC on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_disk_ends_with_a_clear_message_and_no_partial_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(command(run_dir), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "cannot write the run's files" in out and "Free disk space" in out and "Traceback" not in out
    ckpt_dir = run_dir / "checkpoints"
    assert not list(ckpt_dir.glob(".*.tmp")), "a partial checkpoint was left behind"
    assert not (ckpt_dir / "latest").exists()  # nothing claims to be a usable checkpoint
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
