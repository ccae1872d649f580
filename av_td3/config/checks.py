"""Checks of a configuration: :func:`validate` (ranges, choices and cross-field rules of the schema in
:mod:`av_td3.config.schema`, each error naming the full key and the fix), :func:`to_config`, and the command-line
pre-checks ``launch.py`` runs before Hydra composes anything (config-group choices, values of the wrong type, the
output dir; the nearest valid key for a typo is launch.py's own)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from av_td3.config.schema import TM_PORT_OFFSET, CarlaConfig, Config, ConfigError
from av_td3.config.tree import flatten, schema_fields

# What `<key>=null` means, for the keys where null is the way to turn something off (named in range errors, since
# 0 or None are the values people try first).
NULL_MEANS = {"agent.clip.actor": "turns clipping off for the actor, in every agent.clip.mode",
              "agent.clip.critic": "turns clipping off for the critic, in every agent.clip.mode",
              "env.carla.tm_port": "uses env.carla.port + 6000"}


def _check_field(key: str, value: Any, meta: Mapping[str, Any]) -> None:
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


def validate(cfg: Config) -> Config:
    """Check every range and cross-field rule; raise :class:`ConfigError` naming the key and the fix."""
    metadata = {f.key: f.metadata for f in schema_fields(Config)}
    for key, value in flatten(cfg).items():
        if metadata.get(key):
            _check_field(key, value, metadata[key])
    t, a, e = cfg.trainer, cfg.agent, cfg.env
    if a.batch_size > a.buffer_size:
        raise ConfigError(f"agent.batch_size={a.batch_size} is larger than agent.buffer_size={a.buffer_size}: "
                          "lower agent.batch_size or raise agent.buffer_size.")
    if e.policy_frequency > e.simulation_frequency:
        raise ConfigError(f"env.policy_frequency={e.policy_frequency} exceeds env.simulation_frequency="
                          f"{e.simulation_frequency}: the policy cannot act more often than the simulator steps.")
    if t.resume not in ("auto", "none") and not t.resume.endswith((".pt", "latest")):
        raise ConfigError(f"trainer.resume={t.resume!r}: use auto, none, or the path of a checkpoint (.pt) file.")
    if e.name == "carla":
        _check_tm_port(e.carla)
    if not cfg.logger.tensorboard and not cfg.logger.csv and not cfg.logger.wandb and not cfg.logger.mlflow:
        raise ConfigError("logger selects no backend: use e.g. `logger=[tensorboard,csv]`.")
    return cfg


def _check_tm_port(c: CarlaConfig) -> None:
    """The Traffic Manager's port (null: the server's + 6000) must exist and must not be one of the server's own
    three (env.carla.port to port + 2): the worker could not open it."""
    port = c.traffic_manager_port()
    if port > 65535:  # only with tm_port null: the key at fault is env.carla.port
        raise ConfigError(f"env.carla.port={c.port} leaves no Traffic Manager port: env.carla.tm_port=null means "
                          f"env.carla.port + {TM_PORT_OFFSET} = {port}, beyond 65535. Set env.carla.tm_port to a free "
                          "port (e.g. `env.carla.tm_port=8000`), or use a lower env.carla.port.")
    if c.port <= port <= c.port + 2:
        raise ConfigError(f"env.carla.tm_port={port} is one of the CARLA server's own ports ({c.port}-{c.port + 2} "
                          f"with env.carla.port={c.port}): choose another, or leave it out (null) to use "
                          f"env.carla.port + {TM_PORT_OFFSET}.")


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn a composed DictConfig into a validated :class:`Config` object."""
    if isinstance(cfg, Config):
        return validate(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):  # composed without the schema (e.g. a bare dict in a test)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    assert isinstance(obj, Config), "merged onto the schema, a config is a Config"
    return validate(obj)


# The config folder shipped with the package (in a checkout, av_td3/conf links to the repository's conf/).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def override_values(override: Any) -> list[Any]:
    """The values a parsed Hydra override gives its key: one, or each of a sweep's list (``a,b,c``); none for a
    range or interval sweep, whose values only the sweeper knows."""
    from hydra.core.override_parser.types import ChoiceSweep, Sweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    return [] if isinstance(value, Sweep) else [value]


def _parse_overrides(args: list[str]) -> list[Any]:
    """Hydra's parse of the ``key=value`` arguments; [] on a syntax error, which Hydra's own message places."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-") and "=" in a])
    except HydraException:
        return []


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Catch ``group=<not an option>`` before Hydra, which answers ``trainer=0`` with a traceback and ``env=carla2``
    with its config search path: name the group, its options (the nearest one first) and the fix.

    Only overrides of config groups (folders of ``conf/``) are checked; everything else is left to Hydra.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for o in _parse_overrides(args):
        key = o.key_or_group.lstrip("+~")
        if key not in groups or o.is_delete():
            continue
        choices = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        group = f"'{key}' is a config group; choose one of {', '.join(choices)}"
        for value in override_values(o):
            names = value if isinstance(value, list) else [value]  # logger=[tensorboard,csv]: several of one group
            if value is None:  # Hydra answers a null group choice with a traceback
                raise ConfigError(f"{key}=null: {group}, or leave `{key}=` out to use the default.")
            if not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{key}={value!r}: {group} (e.g. `{key}={choices[0] if choices else 'NAME'}`), or "
                                  f"set one of its keys (e.g. `{key}.<key>=<value>`).")
            for name in names:
                if name not in choices:
                    near = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
                    chosen = near[0] if near else choices[0]
                    if isinstance(value, list):  # the fix keeps the rest of the list
                        chosen = f"[{','.join(chosen if n == name else str(n) for n in names)}]"
                    fix = f"did you mean `{key}={chosen}`?" if near else f"e.g. `{key}={chosen}`."
                    raise ConfigError(f"{key}={name}: there is no conf/{key}/{name}.yaml. {group}: {fix}")


def check_override_types(args: list[str]) -> None:
    """Catch a value Hydra cannot convert to its key's type (``seed=abc``, ``trainer.total_steps=1e4``) before
    Hydra, whose message quotes OmegaConf's internals: name the key, the type it takes and the fix. Each value of a
    sweep (``seed=0,1,abc``) is checked; keys the schema does not have are left to :func:`launch.check_override_keys`
    and Hydra, interpolations (``${...}``) to Hydra."""
    from omegaconf.errors import ValidationError
    from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

    nodes: dict[type, type[IntegerNode | FloatNode | BooleanNode]] = {int: IntegerNode, float: FloatNode,
                                                                    bool: BooleanNode}
    types = schema_types()
    for o in _parse_overrides(args):
        if o.is_hydra_override() or o.is_delete() or o.key_or_group not in types:
            continue
        key = o.key_or_group
        kind, nullable = types[key]
        if kind not in nodes:
            continue
        values = override_values(o)
        # as typed (1e4, not Hydra's 10000.0) where the override gives one value
        typed = o.input_line.split("=", 1)[1] if len(values) == 1 and not o.is_sweep_override() else None
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue
            try:
                nodes[kind](value=value, is_optional=nullable)
            except ValidationError:
                raise ConfigError(_type_fix(key, typed or str(value), value, kind)) from None


def _type_fix(key: str, typed: str, value: Any, kind: type) -> str:
    """The message for ``key=typed`` (``value`` as Hydra parsed it), which is not a ``kind``."""
    default = OmegaConf.select(OmegaConf.structured(Config), key)
    example = f"`{key}={str(default).lower() if isinstance(default, bool) else default}` (the default)"
    if value is None:
        return f"{key}=null: {key} cannot be null; give a value, e.g. {example}."
    if kind is int and isinstance(value, float) and value.is_integer():
        return (f"{key}={typed}: {key} takes an integer, and {typed} is read as the decimal number {value}: write "
                f"`{key}={int(value)}`.")
    what = {int: "an integer (a whole number)", float: "a number", bool: "true or false"}[kind]
    return f"{key}={typed}: {key} takes {what}, and {typed!r} is not one: give one, e.g. {example}."


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


def schema_types(cls: type = Config) -> dict[str, tuple[Any, bool]]:
    """Every leaf key of the schema, dotted, mapped to its type (``int``, ``float``, ``str``, ``list[int]``, ...)
    and whether it accepts null."""
    return {key: (kind, nullable) for key, kind, nullable, _ in schema_fields(cls)
            if not dataclasses.is_dataclass(kind)}


def schema_keys(cls: type = Config) -> dict[str, bool]:
    """Every key of the schema, dotted (sections too, e.g. ``agent.clip`` and ``agent.clip.actor``), mapped to
    whether it accepts null. The command-line pre-checks use it to name the nearest valid key for a typo."""
    return {f.key: f.nullable for f in schema_fields(cls)}
