"""Nothing the trainer reads can run code: a crafted checkpoint is refused before anything in it is rebuilt, an
old one needs an explicit trainer.trust_checkpoint=true, and temporary files are created exclusively."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from av_td3 import rundir
from av_td3.checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointManager, UnsafeCheckpointError,
                               atomic_write_bytes, load)
from av_td3.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parent.parent


class WritesMarker:
    """Unpickling this object calls ``open(path, "w")``, creating ``path``: what a crafted checkpoint could do
    with any other function (delete files, start a shell)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like an av-td3 checkpoint and creates ``marker`` when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT_VERSION, "step": 100, "episodes": 1, "payload": WritesMarker(marker)}, path)
    return path


def launch(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "debug=smoke", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_the_crafted_payload_runs_when_unpickled_in_full(tmp_path: Path) -> None:
    """The control: the payload the tests below use really runs code under a full unpickle."""
    torch.load(crafted_checkpoint(tmp_path / "c.pt", tmp_path / "marker"), weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("given_as", ["trainer.resume=<file>", "checkpoints/ with trainer.resume=auto"])
def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path: Path, given_as: str) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    if given_as.startswith("checkpoints/"):
        crafted_checkpoint(run_dir / "checkpoints" / "step_0000000100.pt", marker)
        (run_dir / "checkpoints" / "latest").write_text("step_0000000100.pt")
        overrides: tuple[str, ...] = ()
    else:
        overrides = (f"trainer.resume={crafted_checkpoint(tmp_path / 'from_a_colleague.pt', marker)}",)
    done = launch(run_dir, *overrides)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "was not loaded" in out and "io.open" in out and "trainer.trust_checkpoint=true" in out
    assert "Traceback" not in out
    assert not marker.exists()


def test_resume_auto_does_not_skip_a_crafted_checkpoint_for_an_older_one(tmp_path: Path) -> None:
    """Falling back silently would hide the file; the user decides (delete it or trust it)."""
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"step": 1}, 1)
    crafted_checkpoint(tmp_path / "step_0000000002.pt", tmp_path / "marker")
    (tmp_path / "latest").write_text("step_0000000002.pt")
    with pytest.raises(UnsafeCheckpointError, match="step_0000000002.pt was not loaded"):
        mgr.load_latest()
    assert not (tmp_path / "marker").exists()


def test_garbage_is_reported_as_corrupt_not_as_unsafe(tmp_path: Path) -> None:
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        load(tmp_path / "g.pt")
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_numpy_values_are_saved_as_tensors_and_numbers_and_load_as_data(tmp_path: Path) -> None:
    legacy = np.random.get_state()
    expected = np.random.random(3)
    path = CheckpointManager(tmp_path, keep=1).save(
        {"a": np.arange(5, dtype=np.uint32), "x": np.float64(0.25), "n": np.int64(7),
         "rng": np.random.default_rng(3).bit_generator.state, "legacy": legacy}, 1)
    state = torch.load(path, weights_only=True)  # no allow-list needed
    assert state["a"].dtype == torch.uint32 and np.array_equal(state["a"].numpy(), np.arange(5))
    assert type(state["x"]) is float and state["x"] == 0.25 and type(state["n"]) is int
    assert state["rng"] == np.random.default_rng(3).bit_generator.state
    np.random.set_state(state["legacy"])  # numpy takes its key array back as a tensor
    assert np.array_equal(np.random.random(3), expected)


def test_an_object_that_needs_unpickling_is_refused_at_save_time(tmp_path: Path) -> None:
    """A checkpoint that could not be read back as data is never written."""
    mgr = CheckpointManager(tmp_path, keep=1)
    with pytest.raises(TypeError, match=r"checkpoint\['agent'\]\['monitor'\]\['when'\] is a builtins.object"):
        mgr.save({"agent": {"monitor": {"when": object()}}}, 1)
    assert mgr.all() == [] and not (tmp_path / "latest").exists()


def format_1(state: dict, smoke_buffer: ReplayBuffer) -> dict:
    """``state`` (format 2) as av-td3 wrote it before format 2: numpy arrays for the legacy numpy RNG state and for
    every allocated row of the replay buffer, which only a full unpickle reads."""
    smoke_buffer.load_state_dict(state["buffer"])
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    return {**state, "format": 1,
            "rng": {**state["rng"], "numpy": (name, np.asarray(keys), pos, has_gauss, cached)},
            "buffer": {**smoke_buffer._rows, "ptr": smoke_buffer._ptr, "size": smoke_buffer._size,
                       "needs_start": smoke_buffer._needs_start, "rng": smoke_buffer._rng.bit_generator.state}}


@pytest.mark.slow
def test_trust_checkpoint_resumes_from_a_format_1_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = launch(run_dir, "trainer.total_steps=120")
    assert first.returncode == 0, first.stderr[-3000:]
    mgr = CheckpointManager(run_dir / "checkpoints", 2)
    state, path = mgr.load_latest()
    for other in mgr.all():
        if other != path:
            other.unlink()
    # the smoke preset's buffer: agent.buffer_size=1000, 32x32 frames stacked 2
    torch.save(format_1(state, ReplayBuffer(1000, (32, 32), 2, state["compat"]["state_dim"], 2)), path)

    refused = launch(run_dir, "trainer.total_steps=200")
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out[-3000:]
    assert "was not loaded" in out and "numpy" in out and "trainer.trust_checkpoint=true" in out

    trusted = launch(run_dir, "trainer.total_steps=200", "trainer.trust_checkpoint=true")
    out = trusted.stdout + trusted.stderr
    assert trusted.returncode == 0, out[-3000:]
    assert "trainer.trust_checkpoint=true: unpickling" in out and "resumed from" in out
    newest, _ = mgr.load_latest()  # written in format 2: loads as data, without trust
    assert newest["format"] == FORMAT_VERSION and newest["step"] == 200


def test_the_atomic_write_never_writes_through_a_planted_file(tmp_path: Path, monkeypatch) -> None:
    """Even with its random part guessed, the temporary name is created exclusively: a symlink planted there
    (pointing at a file of the victim's) makes the write fail instead of overwriting the target of the link."""
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "guessed")  # the helper lives in rundir
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".step.pt.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(tmp_path / "step.pt", lambda f: f.write(b"payload"))
    assert victim.read_text() == "precious" and not (tmp_path / "step.pt").exists()


def test_the_atomic_write_leaves_no_temporary_file_and_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "summary.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o640


def test_a_save_removes_temporary_files_left_by_a_killed_writer(tmp_path: Path) -> None:
    (tmp_path / ".step_0000000005.pt.0123abcd.tmp").write_bytes(b"half a checkpoint")
    CheckpointManager(tmp_path, keep=1).save({"step": 6}, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000000006.pt"]


def test_the_csv_purge_on_resume_never_writes_through_a_planted_file(tmp_path: Path, monkeypatch) -> None:
    """The CSV logger rewrites scalars.csv without the points a killed process logged after its checkpoint,
    through the checkpoint's atomic write (rundir.atomic_write_bytes)."""
    from av_td3.config import CsvConfig
    from av_td3.loggers import csv as csv_logger

    (tmp_path / "scalars.csv").write_text("step,tag,value\n10,a,1.0\n20,a,2.0\n30,a,3.0\n")
    csv_logger.CsvBackend(CsvConfig(), tmp_path, purge_step=20).close()
    assert (tmp_path / "scalars.csv").read_text().splitlines() == ["step,tag,value", "10,a,1.0"]
    assert [p.name for p in tmp_path.iterdir()] == ["scalars.csv"]

    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: "guessed")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".scalars.csv.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        csv_logger.CsvBackend(CsvConfig(), tmp_path, purge_step=5)
    assert victim.read_text() == "precious"


def test_summary_json_follows_the_umask_like_every_other_file_of_a_run(tmp_path: Path) -> None:
    from av_td3.rundir import Summary, write_summary

    old = os.umask(0o022)
    try:
        write_summary(tmp_path, Summary())
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600
