"""Hydra-level mistakes on launch.py's command line (a config-group option that does not exist, a value of the wrong
type) get the project's one paragraph before Hydra composes anything: the key or group named, what it takes, the
fix; exit status 2, no traceback, no output folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from av_td3.config import ConfigError
from av_td3.config.checks import check_group_overrides, check_override_types

ROOT = Path(__file__).resolve().parent.parent


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("override, says", [
    ("env=carla2", ("env=carla2: there is no conf/env/carla2.yaml. 'env' is a config group; choose one of carla, "
                    "highway: did you mean `env=carla`?")),
    ("seed=abc", ("seed=abc: seed takes an integer (a whole number), and 'abc' is not one: give one, e.g. `seed=0` "
                  "(the default).")),
    ("trainer.total_steps=1e4", ("trainer.total_steps=1e4: trainer.total_steps takes an integer, and 1e4 is read "
                                 "as the decimal number 10000.0: write `trainer.total_steps=10000`.")),
])
def test_a_hydra_level_mistake_is_one_paragraph_with_the_fix_and_exits_2(tmp_path: Path, override: str,
                                                                          says: str) -> None:
    proc = launch(override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"invalid configuration: {says}"  # one paragraph, nothing of Hydra's
    assert "Traceback" not in proc.stdout + proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, says", [
    (["-m", "seed=0,1,abc"], "seed=abc: seed takes an integer"),                 # each value of a sweep
    (["agent.clip.actor=abc"], "agent.clip.actor takes a number"),
    (["trainer.progress=maybe"], "trainer.progress takes true or false, and 'maybe' is not one"),
    (["seed=null"], "seed=null: seed cannot be null"),
    (["trainer.total_steps=2.5"], "trainer.total_steps takes an integer (a whole number), and '2.5' is not one"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(args: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_override_types(args)


def test_values_hydra_converts_pass() -> None:
    check_override_types(["seed=7", "-m", "seed=0,1,2", "agent.clip.actor=null", "agent.clip.actor=2",
                          "trainer.progress=false", "agent.tau=5e-3", "seed=${oc.env:SEED,0}", "seed=range(0,3)",
                          "agent.lr.actor=interval(1e-5,1e-3)", "env.view=bev", "hydra.run.dir=x", "no_such.key=1"])


@pytest.mark.parametrize("args, says", [
    (["logger=[tensorboard,cvs]"], "did you mean `logger=[tensorboard,csv]`?"),  # the fix keeps the list
    (["-m", "arm=td3,td3_noclipp"], "did you mean `arm=td3_noclip`?"),            # each option of a sweep
    (["experiment=null"], "experiment=null: 'experiment' is a config group; choose one of"),
    (["env=zzz"], "e.g. `env=carla`"),
])
def test_a_group_option_that_does_not_exist_names_the_options(args: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_group_overrides(args)


def test_existing_group_options_pass() -> None:
    check_group_overrides(["-m", "arm=td3,td3_noclip", "logger=[tensorboard,csv]", "+experiment=clip_study",
                           "~stress", "launcher=local_parallel", "hydra/launcher=basic"])
