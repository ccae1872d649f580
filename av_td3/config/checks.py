"""Checks of a configuration: :func:`validate` (ranges, choices and cross-field rules of the schema in
:mod:`av_td3.config.schema`, each error naming the full key and the fix), :func:`to_config`, and the command-line
pre-checks ``launch.py`` runs before Hydra composes anything (config-group choices, the output dir, the nearest
valid key for a typo)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from av_td3.config.schema import Config, ConfigError

# What `<key>=null` means, for the keys where null is the way to turn something off (named in range errors, since
# 0 or None are the values people try first).
NULL_MEANS = {"agent.clip.actor": "turns clipping off for the actor, in every agent.clip.mode",
              "agent.clip.critic": "turns clipping off for the critic, in every agent.clip.mode"}


def _check_field(key: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid: choose one of {', '.join(map(str, choices))} "
                              f"(e.g. `{key}={choices[0]}`).")
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number: give a finite value.")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        op = ">" if meta.get("lo_open") else ">="
        off = f" `{key}=null` {NULL_MEANS[key]}." if key in NULL_MEANS else ""
        raise ConfigError(f"{key}={value} is out of range: it must be {op} {lo}.{off}")
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        op = "<" if meta.get("hi_open") else "<="
        raise ConfigError(f"{key}={value} is out of range: it must be {op} {hi}.")


def _walk(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _walk(value, key + ".")
        elif f.metadata:
            _check_field(key, value, f.metadata)


def validate(cfg: Config) -> Config:
    """Check every range and cross-field rule; raise :class:`ConfigError` naming the key and the fix."""
    _walk(cfg, "")
    t, a, e = cfg.trainer, cfg.agent, cfg.env
    if a.batch_size > a.buffer_size:
        raise ConfigError(f"agent.batch_size={a.batch_size} is larger than agent.buffer_size={a.buffer_size}: "
                          "lower agent.batch_size or raise agent.buffer_size.")
    if e.policy_frequency > e.simulation_frequency:
        raise ConfigError(f"env.policy_frequency={e.policy_frequency} exceeds env.simulation_frequency="
                          f"{e.simulation_frequency}: the policy cannot act more often than the simulator steps.")
    if t.resume not in ("auto", "none") and not t.resume.endswith((".pt", "latest")):
        raise ConfigError(f"trainer.resume={t.resume!r}: use auto, none, or the path of a checkpoint (.pt) file.")
    if not cfg.logger.tensorboard and not cfg.logger.csv and not cfg.logger.wandb and not cfg.logger.mlflow:
        raise ConfigError("logger selects no backend: use e.g. `logger=[tensorboard,csv]`.")
    return cfg


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn a composed DictConfig into a validated :class:`Config` object."""
    if isinstance(cfg, Config):
        return validate(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):  # composed without the schema (e.g. a bare dict in a test)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    return validate(obj)  # type: ignore[arg-type]


# The config folder shipped with the package (in a checkout, av_td3/conf links to the repository's conf/).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Catch ``group=<not a name>`` (e.g. ``trainer=0``) before Hydra, which answers it with a traceback.

    Only overrides of config groups (folders of ``conf/``) are checked; everything else is left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    candidates = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # a syntax error: Hydra's own message says where
    for o in overrides:
        key = o.key_or_group.lstrip("+~")
        value = o.value()
        names = value if isinstance(value, list) else [value]  # logger=[tensorboard,csv]: several of one group
        if key in groups and not o.is_delete() and not all(isinstance(v, str) for v in names):
            choices = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            raise ConfigError(f"{key}={value!r}: '{key}' is a config group; choose one of "
                              f"{', '.join(choices)} (e.g. `{key}={choices[0] if choices else 'NAME'}`), or set "
                              f"one of its keys (e.g. `{key}.<key>=<value>`).")


def check_output_dir(args: list[str], cwd: Path | None = None) -> None:
    """Catch an output dir that cannot be created or written before Hydra, which would fail on it with a traceback.

    Checks the fixed part of ``hydra.run.dir`` (``hydra.sweep.dir`` with ``-m``), or ``outputs/`` by default:
    the nearest part of it that exists must be a writable directory.
    """
    multirun = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = "outputs"
    for a in args:
        if a.lstrip("+").startswith(key + "="):
            value = a.split("=", 1)[1].strip("'\"")
    fixed = value.split("${", 1)[0] or "."  # the part before the first interpolation (e.g. ${now:...})
    path = Path(fixed).expanduser()
    existing = (path if path.is_absolute() else (cwd or Path.cwd()) / path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={value}: {existing} is a file, not a directory, so the run's output dir cannot be "
                          f"created there. Choose another dir with {key}=PATH.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: {existing} is not writable by this user, so the run's output dir cannot "
                          f"be created there. Fix its permissions or choose another dir with {key}=PATH.")


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, bool]:
    """Every key of the schema, dotted (sections too, e.g. ``agent.clip`` and ``agent.clip.actor``), mapped to
    whether it accepts null. The command-line pre-checks use it to name the nearest valid key for a typo."""
    import typing

    keys: dict[str, bool] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        nullable = type(None) in args
        inner = next((t for t in args if t is not type(None)), hint) if nullable else hint
        keys[prefix + name] = nullable
        if dataclasses.is_dataclass(inner):
            keys.update(schema_keys(inner, f"{prefix}{name}."))
    return keys
