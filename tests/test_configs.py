"""Every preset in conf/ composes into a valid configuration, and the files the root config selects by default
restate nothing the schema already says (so YAML and schema cannot disagree about a default)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import yaml
from hydra import compose, initialize_config_dir

from av_td3.config import CONF_DIR, Config, to_config
from av_td3.rundir import flatten

CONF = str(CONF_DIR)
# Launcher presets whose Hydra plugin is an optional install (the cluster extra).
PLUGINS = {"ray": "hydra_plugins.hydra_ray_launcher", "slurm": "hydra_plugins.hydra_submitit_launcher",
           "local_parallel": "hydra_plugins.hydra_joblib_launcher"}


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("override", [f"{g}={p}" for g in ("experiment", "arm", "stress") for p in _presets(g)])
def test_every_experiment_arm_and_stress_composes_and_validates(override: str) -> None:
    to_config(_compose(override))


def test_a_stress_preset_changes_what_it_names() -> None:
    default = to_config(_compose())
    assert to_config(_compose("stress=penalty100")).env.reward.collision_penalty == 100.0 != \
        default.env.reward.collision_penalty
    assert to_config(_compose("stress=no_target")).agent.tau == 1.0 != default.agent.tau
    assert to_config(_compose("stress=sgd", "arm=td3_noclip")).agent.optimizer == "sgd"


@pytest.mark.parametrize("name", _presets("launcher"))
def test_every_launcher_preset_composes(name: str) -> None:
    if importlib.util.find_spec(PLUGINS[name]) is None:
        pytest.skip(f"launcher={name} needs its Hydra plugin ({PLUGINS[name]}), an optional install")
    cfg = _compose(f"launcher={name}", hydra=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    to_config(_compose(f"launcher={name}"))


def test_every_experiments_swept_values_are_valid() -> None:
    for name in _presets("experiment"):
        params = _compose(f"experiment={name}", hydra=True).hydra.sweeper.params or {}
        for key, values in params.items():
            for value in str(values).split(","):
                to_config(_compose(f"experiment={name}", f"{key}={value}"))


# The group files conf/config.yaml selects when nothing is overridden, and the schema section each fills.
DEFAULT_FILES = {"trainer/default.yaml": "trainer", "agent/td3.yaml": "agent", "env/highway.yaml": "env",
                 "monitor/default.yaml": "monitor"}


@pytest.mark.parametrize("path, section", list(DEFAULT_FILES.items()))
def test_default_files_restate_no_schema_default(path: str, section: str) -> None:
    schema = flatten(dataclasses.asdict(getattr(Config(), section)))
    text = yaml.safe_load((CONF_DIR / path).read_text()) or {}
    restated = {k: v for k, v in flatten(text).items() if k in schema and schema[k] == v}
    assert not restated, (f"conf/{path} restates schema defaults {restated}: the schema (av_td3/config.py) is the "
                          "one source of defaults; delete them from the YAML")


def test_the_composed_default_is_the_schema() -> None:
    composed = flatten(dataclasses.asdict(to_config(_compose())))
    schema = flatten(dataclasses.asdict(Config()))
    differ = {k: (schema.get(k), v) for k, v in composed.items() if schema.get(k) != v and not k.startswith("logger.")}
    assert differ == {}, differ


def test_the_keys_left_out_of_job_folders_are_the_run_only_keys_and_the_presets() -> None:
    """One list: conf/config.yaml's exclude_keys (sweep job folder names) = rundir.UNNAMED_OVERRIDES, the run-only
    keys + preset choices, which compare also leaves out of its group labels (tests/test_rundir.py)."""
    from av_td3.rundir import PRESET_CHOICES, RUN_ONLY_KEYS, UNNAMED_OVERRIDES

    cfg = _compose(hydra=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == set(UNNAMED_OVERRIDES) == set(PRESET_CHOICES | RUN_ONLY_KEYS)
