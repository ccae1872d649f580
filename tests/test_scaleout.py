"""Scale-out for real: a sweep on a running Ray head, SLURM-style preemption and requeue through submitit's local
executor (and the rerun of the half-finished sweep through it), and what an installed package promises at import
(gymnasium ids registered lazily, every subcommand in ``av-td3 --help``, conf/ shipped inside the package).

The Ray and submitit tests start real processes and write only under pytest's tmp_path (Ray's session files go to
a short temp dir of their own, removed afterwards: see :func:`start_ray_head`)."""

from __future__ import annotations

import csv
import fnmatch
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"  # the ray CLI installed next to this interpreter


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    out.pop("SDL_VIDEODRIVER", None)
    return out


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *args]


def read_rows(job_dir: Path) -> list[tuple[int, str, float]]:
    with open(job_dir / "scalars.csv", newline="") as f:
        return [(int(r["step"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]


def job_log(job_dir: Path) -> str:
    return (job_dir / "launch.log").read_text()


# ------------------------------------------------------------------------------------------------ packaging
def test_import_registers_the_gym_id_and_the_simulator_loads_only_at_make(tmp_path: Path) -> None:
    code = (
        "import sys, av_td3, gymnasium as gym\n"
        "heavy = ('av_td3.envs', 'av_td3.envs.highway', 'highway_env', 'pygame', 'torch')\n"
        "print('registered', 'av_td3/Highway-v0' in gym.registry)\n"
        "print('imported', sorted(m for m in heavy if m in sys.modules))\n"
        "e = gym.make('av_td3/Highway-v0', npcs=2, image={'height': 32, 'width': 32, 'stack': 2})\n"
        "obs, _ = e.reset(seed=0)\n"
        "print('image', obs['image'].shape, 'highway_env' in sys.modules)\n"
        "e.close()\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["registered True", "imported []", "image (2, 32, 32) True"]


def test_help_lists_every_subcommand(capsys) -> None:
    from av_td3.cli import build_parser, main

    (subparsers,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    missing = [name for name in subparsers.choices if not re.search(rf"^\s+{name}\s+\S", out, re.M)]
    assert not missing, f"subcommands without a help line in `av-td3 --help`: {missing}\n{out}"


def test_conf_ships_inside_the_package() -> None:
    """conf/ is package data (av_td3/conf): every preset is matched by the wheel's package-data patterns."""
    import av_td3

    packaged = Path(av_td3.__file__).parent / "conf"
    assert (packaged / "config.yaml").is_file()
    presets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"conf/{p.relative_to(packaged).as_posix()}" for p in packaged.rglob("*.yaml")} == presets
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["av_td3"]
    # fnmatch's * crosses '/': compare the depth too, as setuptools' glob does
    shipped = {p for p in presets for pat in patterns if fnmatch.fnmatch(p, pat) and p.count("/") == pat.count("/")}
    assert shipped == presets, f"not shipped in the wheel: {sorted(presets - shipped)}"


# ------------------------------------------------------------------------------------------------ Ray
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray replaces 127.0.0.1 by the machine's outward address unless clusters are switched off, as on macOS: with
# this the head, its raylet and the driver all stay on the loopback interface. Token authentication with a token
# of the test's own, given to the head and the driver: Ray 2.60 otherwise turns it on when ~/.ray/auth_token
# exists (any local ray.init() writes one), and a head and a driver that disagree cannot connect.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
# What Ray writes when it is not told where: its default temp dir and the token file.
RAY_DEFAULT_FILES = (Path("/tmp/ray"), Path.home() / ".ray" / "auth_token")


def start_ray_head(cwd: Path) -> tuple[subprocess.Popen, str, Path]:
    """``ray start --head --block`` in a session of its own: SIGTERM to that one process stops every Ray process it
    started. Its session files go to a short temp dir: Ray's socket paths inside it must stay under 107 bytes,
    which a path under pytest's tmp_path exceeds."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    log = open(cwd / "ray_head.log", "w")
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--metrics-export-port={free_port()}"],
        cwd=cwd, env=env(**RAY_ENV), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + 180
    while "Ray runtime started" not in (cwd / "ray_head.log").read_text():
        assert head.poll() is None, (cwd / "ray_head.log").read_text()[-3000:]
        assert time.time() < deadline, "the Ray head did not start within 180 s"
        time.sleep(0.2)
    return head, f"127.0.0.1:{port}", temp


def ray_processes(head: subprocess.Popen, temp: Path) -> list[psutil.Process]:
    """The head's processes: its session (process group) and anything naming its temp dir."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == head.pid or str(temp) in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return [p for p in found if p.pid != head.pid or head.poll() is None]


def stop_ray_head(head: subprocess.Popen, temp: Path) -> list[str]:
    """Stop this head alone (``ray stop`` would stop every Ray on the machine); return the command lines of its
    processes still running 30 s after the head itself exited (then killed)."""
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(ray_processes(head, temp), timeout=30)
    survivors = []
    for p in alive:
        try:
            survivors.append(" ".join(p.cmdline())[:200])
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if head.poll() is None:
        head.kill()
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)
    return survivors


ray_installed = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None or not RAY.exists(),
    reason="needs the cluster extra: pip install '.[cluster]'")


@pytest.mark.slow
@ray_installed
def test_ray_sweep_on_a_running_head(tmp_path: Path) -> None:
    """The case that matters for outgrowing one machine: joining a Ray cluster that is already running."""
    existed = {p for p in RAY_DEFAULT_FILES if p.exists()}
    sweep = tmp_path / "sweep"
    head, address, temp = start_ray_head(tmp_path)
    try:
        done = subprocess.run(
            launch_cmd("-m", "launcher=ray", "debug=smoke", "seed=0,1", f"hydra.launcher.ray.init.address={address}",
                       f"hydra.sweep.dir={sweep}"),
            cwd=tmp_path, env=env(**RAY_ENV), capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert f"Connecting to existing Ray cluster at address: {address}" in out
        assert "(_run_job pid=" in out  # the jobs' logs, forwarded from Ray worker processes
        assert "all 2 jobs completed" in out
        for seed in (0, 1):
            job = sweep / f"seed={seed}"
            assert (job / ".hydra" / "config.yaml").is_file() and list((job / "tb").glob("events.out.tfevents.*"))
            summary = (job / "summary.json").read_text()
            assert '"status": "completed"' in summary and '"steps": 300' in summary
        compared = subprocess.run([sys.executable, "-m", "av_td3.cli", "compare", str(sweep)], cwd=tmp_path,
                                  env=env(), capture_output=True, text=True, timeout=300)
        assert compared.returncode == 0, compared.stderr[-3000:]
        assert re.search(r"^\| `.*` \| 2 \(2 completed / 0 stopped\) \|", compared.stdout, re.M), compared.stdout
    finally:
        survivors = stop_ray_head(head, temp)
    assert survivors == [], f"Ray processes still running 30 s after SIGTERM: {survivors}"
    assert not ray_processes(head, temp)
    assert {p for p in RAY_DEFAULT_FILES if p.exists()} == existed, "Ray wrote outside its temp dir"


# ------------------------------------------------------------------------------------------------ submitit
# 400 steps, learning from step 100, episodes of at most 40 steps, a log line every 40 steps.
SUBMITIT_ARGS = ("debug=smoke", "trainer.total_steps=400", "trainer.log_every=40", "trainer.checkpoint_every=80",
                 "trainer.eval_every=200", "env.max_episode_steps=40")
TOTAL, LEARNING_STARTS, LOG_EVERY, MAX_EPISODE = 400, 100, 40, 40


def seed_of(job_name: str) -> str:
    """``seed=N`` from a job folder's name (Hydra's override_dirname: the job's overrides, comma-separated)."""
    return next(o for o in job_name.split(",") if o.startswith("seed="))


def submitit_tasks(launcher: subprocess.Popen, sweep: Path) -> dict[Path, psutil.Process]:
    """Job folder -> the process submitit runs that job in (python -m submitit.core._submit), found by the
    scalars.csv it holds open."""
    tasks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "submitit.core._submit" in " ".join(child.cmdline()):
                for f in child.open_files():
                    if f.path.startswith(str(sweep)) and f.path.endswith("scalars.csv"):
                        tasks[Path(f.path).parent] = child
        except psutil.Error:
            pass
    return tasks


def kill_tree(proc: subprocess.Popen) -> None:
    """After a failure: the launcher and the job processes it started (submitit's controllers and tasks)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.wait()


def logged_past(job_dir: Path, step: int) -> bool:
    try:
        return any(s >= step and tag == "perf/steps_per_s" for s, tag, _ in read_rows(job_dir))
    except (OSError, KeyError, ValueError):  # not written yet, or a row being written
        return False


def assert_steps_continuous(job_dir: Path, stopped_at: int) -> None:
    """scalars.csv of a run interrupted at env step ``stopped_at`` and resumed: no step lost or counted twice."""
    rows = read_rows(job_dir)
    assert len({(s, t) for s, t, _ in rows}) == len(rows), "a (step, tag) logged twice"
    # every log point once, in order, across both attempts
    assert [s for s, t, _ in rows if t == "perf/steps_per_s"] == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY))
    # one critic update per env step from learning_starts on, counted across the interruption
    assert sum(v for _, t, v in rows if t == "grad/critic/updates") == TOTAL - LEARNING_STARTS
    # episodes tile the steps: each starts where the previous ended, except the one cut short by the interruption
    # (no row: it never ended), after which the next starts exactly at the resumed step
    episodes = [(s - int(v), s) for s, t, v in rows if t == "episode/length"]
    assert episodes[0][0] == 0
    gaps = [(prev_end, start) for (_, prev_end), (start, _) in zip(episodes, episodes[1:]) if start != prev_end]
    assert len(gaps) == 1 and gaps[0][1] == stopped_at, (gaps, stopped_at)
    assert 0 < stopped_at - gaps[0][0] < MAX_EPISODE
    assert TOTAL - episodes[-1][1] < MAX_EPISODE


@pytest.mark.slow
def test_submitit_preemption_requeues_and_a_rerun_finishes_the_sweep(tmp_path: Path) -> None:
    """Two jobs through submitit's local executor. seed=0 gets the signal SLURM sends before preemption or the
    time limit (USR2): it checkpoints, submitit requeues it, it resumes in the same folder and completes.
    seed=1 is cancelled (SIGTERM): it checkpoints and stops, so the sweep ends half-finished. Rerunning the same
    command skips seed=0 and resumes seed=1."""
    sweep = tmp_path / "sweep"
    cmd = launch_cmd("-m", "hydra/launcher=submitit_local", *SUBMITIT_ARGS, "seed=0,1", f"hydra.sweep.dir={sweep}")
    with open(tmp_path / "first.log", "w") as out:  # a file, not a pipe nobody reads while the jobs run
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT)
    signals = {"seed=0": signal.SIGUSR2, "seed=1": signal.SIGTERM}
    sent: set[str] = set()
    deadline = time.time() + 400
    try:
        while sent != set(signals):  # each job is signalled once it is learning (past step 100), well before 400
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, f"jobs not past step 120 within 400 s (signalled: {sent})"
            for job, task in submitit_tasks(first, sweep).items():
                if seed_of(job.name) not in sent and logged_past(job, LEARNING_STARTS + 20):
                    task.send_signal(signals[seed_of(job.name)])
                    sent.add(seed_of(job.name))
            time.sleep(0.1)
        first.wait(timeout=600)
    except BaseException:
        kill_tree(first)
        raise
    out = (tmp_path / "first.log").read_text()
    assert first.returncode != 0, "seed=1 was cancelled: the sweep cannot report success\n" + out[-3000:]

    jobs = {seed_of(p.name): p for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert sorted(jobs) == ["seed=0", "seed=1"]
    preempted, cancelled = jobs["seed=0"], jobs["seed=1"]
    log = job_log(preempted)
    at = int(re.search(r"sent SIGUSR2 at env step (\d+): checkpoint written", log).group(1))
    assert LEARNING_STARTS < at < TOTAL
    assert re.search(rf"resumed from \S+step_0*{at}\.pt at env step {at} ", log), log[-3000:]
    assert "Requeued job" in "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert '"status": "completed"' in (preempted / "summary.json").read_text()
    assert_steps_continuous(preempted, at)
    stopped = (cancelled / "summary.json").read_text()
    assert '"status": "stopped"' in stopped and "SIGTERM" in stopped, stopped
    cut = int(re.search(r"SIGTERM at env step (\d+): checkpoint written", job_log(cancelled)).group(1))

    def results(job: Path) -> dict[str, int]:  # what training wrote (Hydra rewrites .hydra/ on every attempt)
        return {str(p): p.stat().st_mtime_ns for p in job.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name != "launch.log"}

    before = results(preempted)
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (out + rerun.stdout + rerun.stderr)[-4000:]
    assert "all 2 jobs completed" in rerun.stdout
    assert "already completed, skipping" in job_log(preempted) and results(preempted) == before
    assert re.search(rf"resumed from \S+step_0*{cut}\.pt at env step {cut} ", job_log(cancelled))
    assert '"status": "completed"' in (cancelled / "summary.json").read_text()
    assert_steps_continuous(cancelled, cut)

