"""A newcomer's first hour (issue 19): commands printed by the program work as printed, resume by the printed
command, a progress ETA from the learning phase, config mistakes that name the fix (exit 2), and failed starts
that fail fast and leave no output folder."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from av_td3.config import Config, ConfigError, validate
from av_td3.progress import Progress, eta_s, format_duration

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ("debug=smoke", "trainer.torch_threads=1")


def fresh_shell_env() -> dict[str, str]:
    """A shell where the venv is not activated: only the system's PATH, no VIRTUAL_ENV, no PYTHONPATH."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}


def launch(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------- progress
def test_eta_comes_from_the_learning_phase_rate() -> None:
    # warm-up: 1000 steps in 10 s (100 steps/s); learning since step 1000 at t=10: 100 steps in 20 s (5 steps/s)
    assert eta_s(1100, 2000, phase_step=1000, phase_time=10.0, now=30.0) == pytest.approx(900 / 5)
    assert eta_s(500, 2000, phase_step=None, phase_time=None, now=5.0) is None  # still in the warm-up
    assert eta_s(1001, 2000, phase_step=1000, phase_time=10.0, now=10.5) is None  # no rate yet


def test_progress_says_warm_up_then_an_eta_at_the_learning_rate(caplog) -> None:
    now = [0.0]
    progress = Progress(total=2000, initial=0, learning_starts=1000, bar=False, clock=lambda: now[0],
                        line_every_s=30.0)
    caplog.set_level(logging.INFO, logger="av_td3")
    for step in range(1, 1001):  # warm-up at 100 steps/s
        now[0] += 0.01
        progress.update(step, warmup=True)
    assert progress.describe(now[0]).startswith("warm-up")
    for step in range(1001, 1401):  # learning at 10 steps/s: 400 steps in 40 s
        now[0] += 0.1
        progress.update(step, warmup=False)
    # 600 steps left at the learning rate (10/s) = 60 s; the whole run's average rate would say ~17 s
    assert progress.describe(now[0]).startswith("learning, 1 min 0 s left"), progress.describe(now[0])
    # without a terminal: a line every 30 s (the run lasted 50 s), with the time left once learning has started,
    # and the rate of the learning phase (10 steps/s), not the warm-up's 100
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 1 and "left | 10.0 steps/s" in lines[0], lines


def test_durations_read_as_durations() -> None:
    assert [format_duration(s) for s in (45, 725, 4200, 36000)] == ["45 s", "12 min 5 s", "1 h 10 min", "10 h 0 min"]


# ------------------------------------------------------------------------------------------- config mistakes
def test_a_typo_names_the_nearest_key_and_exits_2(tmp_path: Path) -> None:
    proc = launch("agent.clip.actr=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did you mean `agent.clip.actor`?" in proc.stderr
    assert "+agent.clip.actr" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("old, new", [("env.host=carla", "env.carla.host=carla"),
                                      ("env.camera.x=2.0", "env.carla.camera.x=2.0")])
def test_a_key_that_moved_names_its_new_name_and_exits_2(tmp_path: Path, old: str, new: str) -> None:
    """The CARLA backend's keys moved under env.carla (env.host is env.carla.host); the old name gets the new one."""
    proc = launch(old, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is now {new.split('=')[0]}: write `{new}`" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_none_or_zero_for_a_clip_limit_says_null_turns_clipping_off(tmp_path: Path) -> None:
    proc = launch("agent.clip.actor=None", cwd=tmp_path)
    assert proc.returncode == 2 and "`agent.clip.actor=null` (turns clipping off" in proc.stderr, proc.stderr
    cfg = Config()
    cfg.agent.clip.critic = 0.0
    with pytest.raises(ConfigError, match=r"agent.clip.critic=0.0 is out of range.*`agent.clip.critic=null` turns "
                                          "clipping off"):
        validate(cfg)


@pytest.mark.parametrize("override", ["agent.clip.actor=abc", "env=gta"])
def test_mistakes_hydra_reports_exit_2_too(tmp_path: Path, override: str) -> None:
    proc = launch(override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_experiment_without_m_refuses_naming_the_command(tmp_path: Path) -> None:
    proc = launch("experiment=clip_ablation", "debug=smoke", cwd=tmp_path)
    assert proc.returncode == 2
    assert "launch.py -m experiment=clip_ablation debug=smoke" in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------------------------------------ failed starts
def test_an_unknown_town_fails_before_allocating_and_leaves_no_folder(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = launch(*SMOKE, "env.town=Town01", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "env.town='Town01'" in out and "replay buffer" not in out
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 90  # imports only (the 2-core machine may be busy)


def test_carla_without_a_server_fails_before_allocating_and_leaves_no_folder(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = launch(*SMOKE, "env=carla", f"env.carla.port={port}", "env.carla.timeout_s=1",
                  f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "replay buffer" not in out and "optimizer owns" not in out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- printed commands
def test_the_end_of_sweep_hint_works_as_printed_in_a_fresh_shell(tmp_path: Path) -> None:
    from av_td3.sweep import collect, report
    from tests.analysis_fixtures import write_sweep

    sweep = write_sweep(tmp_path / "sweep", [(["agent.clip.actor=null"], 0), ([], 0)])
    text = report(sweep, collect(sweep))
    command = text.splitlines()[-1].strip()
    assert "compare" in command and not command.startswith(("python ", "av-td3 ")), text
    proc = subprocess.run(command, shell=True, cwd=os.getcwd(), env=fresh_shell_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (command, proc.stderr[-2000:])
    assert (sweep / "comparison.md").exists()


def _venv_python(cwd: Path) -> str:
    """The interpreter as a newcomer types it, `.venv/bin/python`, relative to where the command runs."""
    if sys.prefix == sys.base_prefix:
        return sys.executable
    (cwd / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return ".venv/bin/python"


@pytest.mark.slow
def test_interrupted_run_validates_on_its_updates_and_the_printed_command_resumes_it(tmp_path: Path) -> None:
    python = _venv_python(tmp_path)
    # log_every beyond the run: no metrics are logged before the interrupt, only by the stop's final flush
    args = [*SMOKE, "trainer.log_every=1000"]
    proc = subprocess.Popen([python, str(ROOT / "launch.py"), *args], cwd=tmp_path, env=fresh_shell_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not list(tmp_path.glob("outputs/runs/*/*/checkpoints/latest")):  # first checkpoint: ~50 updates in
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    (run_dir,) = tmp_path.glob("outputs/runs/*/*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["steps"] < 300

    # the metrics gathered since the start were flushed at the stop: validate sees the updates
    csv = (run_dir / "scalars.csv").read_text()
    assert "grad/actor/updates" in csv and "grad/critic/updates" in csv
    checked = subprocess.run([sys.executable, "-m", "av_td3.cli", "validate", str(run_dir)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert "no updates logged" not in checked.stdout + checked.stderr, checked.stdout

    # the message prints the command that resumes, with the interpreter as typed and the run dir
    command = out.split("with the run dir added:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith(f"{python} ") and f"hydra.run.dir=outputs/runs/{run_dir.parent.name}/" in command
    resumed = subprocess.run(shlex.split(command), cwd=tmp_path, env=fresh_shell_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert list(tmp_path.glob("outputs/runs/*/*")) == [run_dir]  # the same folder, no new one
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_rerun_of_an_interrupted_command_is_pointed_to_the_run_it_can_resume(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from av_td3.rundir import interrupted_run

    def run(name: str, status: str, overrides: list[str], nan: bool = False) -> Path:
        d = tmp_path / "runs" / "2026-12-01" / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (d / "summary.json").write_text(json.dumps({"status": status, "steps": 1234,
                                                    "nan_guard": {"triggered": nan}}))
        return d

    wanted = run("10-00-00", "stopped", ["debug=smoke", "seed=1"])
    run("09-00-00", "stopped", ["debug=smoke", "seed=1"])              # older
    run("11-00-00", "completed", ["debug=smoke", "seed=1"])            # nothing to resume
    run("12-00-00", "stopped", ["debug=smoke", "seed=1"], nan=True)    # the NaN guard: resuming diverges again
    run("13-00-00", "stopped", ["debug=smoke", "seed=2"])              # another configuration
    # run-only keys (trainer.progress, trainer.torch_threads, ...) do not make another configuration
    assert interrupted_run(tmp_path / "runs", ["seed=1", "debug=smoke", "trainer.progress=false"]) == (wanted, 1234)
    assert interrupted_run(tmp_path / "runs", ["debug=smoke", "seed=3"]) is None


def test_the_run_folder_is_printed_before_the_first_step(tmp_path: Path) -> None:
    proc = launch("debug=smoke", "trainer.total_steps=120", "trainer.learning_starts=60", "trainer.eval_every=120",
                  "trainer.checkpoint_every=120", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()  # Hydra logs to stdout
    start = next(i for i, line in enumerate(lines) if f"training 120 env steps into {tmp_path / 'run'}" in line)
    first_eval = next(i for i, line in enumerate(lines) if "eval at step" in line)
    assert start < first_eval


def test_make_reinstalls_torch_when_torch_changes_on_an_existing_venv(tmp_path: Path) -> None:
    """`make train TORCH="torch==X"` on an existing .venv installs X (it used to keep the old build silently);
    the same TORCH again installs nothing. pip is replaced by echo: only what make decides is checked."""
    def setup(torch: str) -> str:
        proc = subprocess.run(["make", "-s", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", "PIP=echo INSTALL",
                               f"TORCH={torch}", "setup"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "INSTALL torch==2.13.0" in setup("torch==2.13.0")
    assert "INSTALL" not in setup("torch==2.13.0")
    assert "INSTALL torch==2.5.1" in setup("torch==2.5.1")


def test_the_optuna_ranges_in_sweeps_md_are_the_config_s() -> None:
    import re

    params = (ROOT / "conf" / "hparams_search" / "optuna.yaml").read_text()
    doc = re.sub(r"\s+", " ", (ROOT / "docs" / "sweeps.md").read_text())
    ranges = re.findall(r"(agent\.[\w.]+): tag\(log, interval\(([\d.e-]+), ([\d.e-]+)\)\)", params)
    assert len(ranges) == 4
    for key, lo, hi in ranges:
        shown = {f"[{lo}, {hi}]", f"[{float(lo):g}, {float(hi):g}]"}  # as written in the YAML, or shortened
        assert f"`{key}`" in doc and any(s in doc for s in shown), f"docs/sweeps.md lacks {key}'s range {shown}"


# --------------------------------------------------------------------------------- threads on a shared machine
def test_importing_av_td3_makes_torch_threads_wait_passively_unless_the_user_chose() -> None:
    """OMP_WAIT_POLICY is read once, when torch's OpenMP loads: av_td3 sets it on import, before torch is
    imported (launch.py and the av-td3 command import av_td3 first), and keeps a policy the user set."""
    probe = "import sys, os, av_td3; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["PASSIVE", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split() == ["ACTIVE", "False"], out.stderr


# The default update's page faults, counted in a fresh process: what glibc does with the memory torch frees.
UPDATE_FAULTS_PROBE = """
import resource, torch, av_td3
from av_td3 import machine
from av_td3.bench.config import default_config
from av_td3.bench.updates import build_agent, random_buffer
torch.set_num_threads(1)
agent = build_agent(default_config(), torch.device("cpu"))
buf = random_buffer(agent.spec, 256, 0, torch.device("cpu"))
for i in range(4):
    agent.update(buf.sample(128), i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(8):
    agent.update(buf.sample(128), 4 + i)
print(machine.freed_memory, "|", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc and ru_minflt: Linux")
def test_importing_av_td3_keeps_freed_memory_for_the_next_update_unless_the_user_chose() -> None:
    """An update frees and reallocates tensors of 1-10 MB; with glibc's defaults every one is fresh pages from the
    kernel (thousands of page faults per update). av_td3 sets malloc on import to keep them, and leaves malloc
    alone when the user set a tunable (here a harmless one: glibc's defaults then hold)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(**extra: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", UPDATE_FAULTS_PROBE], capture_output=True, text=True, cwd=ROOT,
                             env={**env, **extra}, timeout=300)
        setting, per_update = out.stdout.strip().rsplit("|", 1)
        return setting.strip(), float(per_update)

    kept, kept_faults = faults()
    chosen, default_faults = faults(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert kept.startswith("kept for reuse") and chosen == "as set by GLIBC_TUNABLES"
    assert kept_faults < 200 < 1000 < default_faults, (kept_faults, default_faults)


def test_another_allocator_or_a_malloc_variable_is_the_users_choice(monkeypatch) -> None:
    from av_td3 import machine

    monkeypatch.setattr(machine, "freed_memory", machine.freed_memory)  # restored after the test
    for var in [v for v in os.environ if v.startswith("MALLOC_") or v in ("GLIBC_TUNABLES", "LD_PRELOAD")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert machine.keep_freed_memory() == "as set by LD_PRELOAD, MALLOC_ARENA_MAX" == machine.freed_memory
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libasan.so")  # not an allocator of its own: left out
    assert machine.keep_freed_memory() == "as set by MALLOC_ARENA_MAX"


def test_a_busy_machine_is_named_with_what_the_run_does_about_it(monkeypatch) -> None:
    from av_td3 import machine

    monkeypatch.setattr(machine, "usable_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert machine.busy_note(2) is None  # one core's worth of other work leaves room
    monkeypatch.setattr(os, "getloadavg", lambda: (3.9, 3.0, 2.0))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    note = machine.busy_note(2)
    assert note is not None and "load average 3.9 on 2 usable CPU(s)" in note and "2 thread(s)" in note
    assert "wait passively" in note and "trainer.torch_threads=1" in note
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY=ACTIVE: spinning threads" in machine.busy_note(2)


def test_a_multi_threaded_run_on_a_busy_machine_says_so_at_start(tmp_path: Path, monkeypatch, caplog) -> None:
    import torch

    from av_td3 import machine
    from av_td3.bench.config import default_config
    from av_td3.train.loop import Trainer

    monkeypatch.setattr(machine, "busy_note", lambda threads: f"busy note for {threads} threads")
    caplog.set_level(logging.WARNING, logger="av_td3")
    before = torch.get_num_threads()
    try:
        for threads, warned in ((2, True), (1, False)):
            caplog.clear()
            Trainer(default_config([*SMOKE[:1], f"trainer.torch_threads={threads}"]),
                    tmp_path / f"run{threads}").envs.close()
            assert ("busy note for 2 threads" in caplog.text) == warned, caplog.text
    finally:
        torch.set_num_threads(before)  # the trainer sets the process's threads
