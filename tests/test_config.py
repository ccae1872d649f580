"""Config composition and validation: wrong types, unknown keys and out-of-range values name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from av_td3.config import Config, ConfigError, to_config

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def load(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def test_defaults_compose_with_the_public_key_names() -> None:
    cfg = load()
    assert cfg.agent.clip.actor == 1.5 and cfg.agent.clip.critic == 200.0 and cfg.agent.policy_freq == 2
    assert cfg.env.name == "highway" and cfg.env.town == "racetrack"
    assert cfg.logger.tensorboard is not None and cfg.logger.csv is not None and cfg.logger.wandb is None


# A value for each public key that differs from its default: the override must arrive, typed, where the trainer
# reads it (tests/test_config_effects.py shows what each one then changes).
PUBLIC_KEYS = {
    "trainer.total_steps": 1234, "trainer.learning_starts": 111, "trainer.eval_every": 2222,
    "trainer.eval_episodes": 3, "trainer.checkpoint_every": 4444, "trainer.log_every": 555, "trainer.device": "cpu",
    "agent.tau": 0.01, "agent.gamma": 0.95, "agent.policy_noise": 0.3, "agent.noise_clip": 0.4,
    "agent.exploration_noise": 0.25, "agent.batch_size": 64, "agent.buffer_size": 5000,
    "env.reward.efficiency": 2.0, "env.reward.lane_keeping": 0.75, "env.reward.comfort": 0.5,
    "env.reward.collision_penalty": 20.0, "env.reward.offroad_penalty": 15.0, "env.reward.progress": 0.3,
}


def _get(cfg: Config, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("key, value", PUBLIC_KEYS.items(), ids=list(PUBLIC_KEYS))
def test_a_public_key_set_on_the_command_line_reaches_the_typed_config(key: str, value: object) -> None:
    assert _get(load(), key) != value, "the test value must differ from the default"
    cfg = load(f"{key}={value}")
    assert _get(cfg, key) == value and type(_get(cfg, key)) is type(value)


def test_null_disables_clipping() -> None:
    cfg = load("agent.clip.actor=null", "agent.clip.critic=null")
    assert cfg.agent.clip.actor is None and cfg.agent.clip.critic is None


def test_the_agc_arm_and_the_sgd_stress_compose() -> None:
    agc = load("arm=td3_agc")
    assert (agc.agent.name, agc.agent.clip.mode, agc.agent.clip.agc) == ("td3", "agc", 0.3)
    sgd = load("stress=sgd")
    assert (sgd.agent.optimizer, sgd.agent.momentum) == ("sgd", 0.9)
    assert (sgd.agent.lr.actor, sgd.agent.lr.critic) == (0.01, 0.01)
    assert sgd.agent.clip.mode == "norm", "a stress, not an arm: the clip is the run's own choice"


def test_smoke_debug_config_is_small() -> None:
    cfg = load("debug=smoke")
    assert cfg.trainer.total_steps <= 500 and cfg.env.image.height <= 48
    assert (cfg.trainer.total_steps - cfg.trainer.learning_starts) * cfg.trainer.updates_per_step >= 100


@pytest.mark.parametrize("override, key", [
    ("agent.lr.actor=fast", "agent.lr.actor"),
    ("trainer.total_steps=1.5", "trainer.total_steps"),
    ("agent.clip.actor=[1]", "agent.clip.actor"),
])
def test_wrong_type_fails_at_compose_time_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        load(override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_unknown_key_fails_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        load("agent.learning_rate=0.1")
    assert "agent.learning_rate" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("agent.tau=1.5", "agent.tau"),
    ("agent.gamma=1.0", "agent.gamma"),
    ("agent.lr.critic=0", "agent.lr.critic"),
    ("agent.clip.actor=-1", "agent.clip.actor"),
    ("agent.policy_freq=0", "agent.policy_freq"),
    ("trainer.device=tpu", "trainer.device"),
    ("agent.encoder=both", "agent.encoder"),
    ("env.image.height=4", "env.image.height"),
    ("env.carla.fixed_delta_s=0.5", "env.carla.fixed_delta_s"),
    ("agent.batch_size=200000", "agent.batch_size"),
    ("monitor.nan_policy=ignore", "monitor.nan_policy"),
    ("agent.lr.actor=nan", "agent.lr.actor"),
    ("agent.clip.mode=autoclip", "agent.clip.mode"),
    ("agent.clip.zscore_scaling=mean", "agent.clip.zscore_scaling"),
    ("agent.clip.agc=0", "agent.clip.agc"),
    ("agent.optimizer=rmsprop", "agent.optimizer"),
    ("agent.momentum=1.0", "agent.momentum"),
])
def test_out_of_range_values_name_the_key_and_the_fix(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(override)
    msg = str(err.value)
    assert msg.startswith(key) and ("must be" in msg or "choose" in msg or "lower" in msg or "finite" in msg)


@pytest.mark.parametrize("overrides, message", [
    (("env.carla.tm_port=2001",), r"^env.carla.tm_port=2001 is one of the CARLA server's own ports \(2000-2002"),
    (("env.carla.port=60000",), (r"^env.carla.port=60000 leaves no Traffic Manager port.*66000, beyond 65535. Set "
                                 r"env.carla.tm_port")),
])
def test_a_traffic_manager_port_that_cannot_be_opened_is_a_config_error(overrides, message) -> None:
    """#35: env.carla.tm_port (null: env.carla.port + 6000) must be a port the worker can open."""
    with pytest.raises(ConfigError, match=message):
        load("env=carla", *overrides)
    cfg = load("env=carla", "env.carla.port=2004")
    assert cfg.env.carla.tm_port is None and cfg.env.carla.traffic_manager_port() == 8004
    assert load("env=carla", "env.carla.port=60000", "env.carla.tm_port=8000").env.carla.traffic_manager_port() == 8000


def test_missing_group_option_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException) as err:
        load("env=gta")
    assert "highway" in str(err.value) and "carla" in str(err.value)


def run_launch(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_bad_value_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    proc = run_launch("agent.tau=7", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "agent.tau=7.0 is out of range" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_unknown_key_exits_non_zero(tmp_path: Path) -> None:
    proc = run_launch("agent.bogus=1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode != 0 and "agent.bogus" in proc.stderr


def test_cli_group_given_a_number_gets_a_message_not_a_traceback(tmp_path: Path) -> None:
    proc = run_launch("trainer=0", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "'trainer' is a config group" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override", ["trainer=[1,2]", "env={a:1}", "logger=[csv,3]"])
def test_group_given_a_list_or_dict_of_non_names_is_a_config_error(override: str) -> None:
    from av_td3.config import check_group_overrides

    with pytest.raises(ConfigError, match="is a config group; choose one of"):
        check_group_overrides([override])
    check_group_overrides(["logger=[tensorboard,csv]", "agent=ddpg"])  # names are for Hydra to resolve
