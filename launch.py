"""Entry point: ``python launch.py [overrides]`` trains one run; ``python launch.py -m ...`` runs a sweep.

Returns the objective (final evaluation return) for Hydra sweepers such as Optuna. Mistakes on the command line
(an unknown key, a group option that does not exist, a value of the wrong type, ``experiment=`` without ``-m``,
...) are caught here before Hydra creates an output dir, each named in one paragraph with its fix, and every
configuration mistake exits with code 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path

# Before pygame can be imported: SDL's "dummy" video driver makes highway-env skip drawing (black frames).
if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
    os.environ["SDL_VIDEODRIVER"] = "offscreen"

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import av_td3.config  # noqa: E402  (registers the config schema)
from av_td3 import commands  # noqa: E402
from av_td3.config import CONF_DIR, NULL_MEANS, ConfigError, renamed_key, schema_keys  # noqa: E402
from av_td3.config.checks import check_override_types, override_values  # noqa: E402
from av_td3.rundir import interrupted_run  # noqa: E402
from av_td3.sweep import SweepIncomplete  # noqa: E402

log = logging.getLogger("av_td3")

EXIT_CONFIG = 2  # as av_td3.app.EXIT_CONFIG (not imported from there: app pulls in torch)
# Config groups whose presets define a sweep (hydra.sweeper.params): without -m they would run one job of it.
SWEEP_GROUPS = ("experiment", "hparams_search")

_task_started = False  # set once Hydra hands over a composed config: errors before that are config mistakes


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from av_td3.app import run_job

    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if not multirun:
        point_to_interrupted_run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    objective, exit_code = run_job(cfg, Path(hc.runtime.output_dir), resume_command=resume_command(multirun),
                                   single_run=not multirun)
    # A single run reports failure through its exit code; a sweep goes on past a failed job (its summary.json
    # records why) but stops entirely when the user interrupts it (exit code 128 + signal).
    if exit_code and (not multirun or exit_code >= 128):
        logging.shutdown()
        sys.exit(exit_code)
    return objective


def resume_command(multirun: bool) -> str | None:
    """The command that resumes this run: the user's own command with its output dir pinned (a single run's
    default dir is a new timestamp each time). None in a launcher's worker process, which never saw it."""
    if not commands.launched_by_launch_py():
        return None
    hc = HydraConfig.get()
    if multirun:
        return commands.launch(sys.argv[1:], {"hydra.sweep.dir": commands.display_path(Path(hc.sweep.dir))},
                               multirun=True)
    return commands.launch(sys.argv[1:], {"hydra.run.dir": commands.display_path(Path(hc.runtime.output_dir))})


def point_to_interrupted_run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """A rerun of the command of an interrupted run starts a new run (in a new timestamped folder): say which run
    it could resume instead, and the command that does (only for the default run dir and trainer.resume=auto)."""
    chose_dir = any(a.lstrip("+").startswith("hydra.run.dir=") for a in sys.argv[1:])
    if chose_dir or cfg.trainer.resume != "auto" or not commands.launched_by_launch_py():
        return
    found = interrupted_run(run_dir.parent.parent, overrides)
    if found is not None:
        earlier, step = found
        command = commands.launch(sys.argv[1:], {"hydra.run.dir": commands.display_path(earlier)})
        log.warning("this starts a new run; the same command was interrupted at env step %d in %s. To resume that "
                    "one instead, stop this run (Ctrl-C) and run:\n    %s", step, earlier, command)


# ---------------------------------------------------------------------------------------- command-line checks
def _parse(arg: str):  # -> hydra Override, or None for what only Hydra can judge (flags, syntax errors)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if arg.startswith("-") or "=" not in arg:
        return None
    try:
        return OverridesParser.create().parse_overrides([arg])[0]
    except HydraException:
        return None


def check_override_keys(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """A moved key names its new name (``env.host`` -> ``env.carla.host``), an unknown key the nearest valid one
    (Hydra's own advice, ``+key=value``, adds the typo instead), and
    ``None`` for a key that takes null says to write ``null`` (Hydra reads ``None`` as text)."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    keys = schema_keys()
    for arg in args:
        o = _parse(arg)
        if o is None or o.is_hydra_override() or o.is_delete():
            continue
        key = o.key_or_group
        if key in groups or "/" in key:  # a config group (agent=ddpg, hydra/launcher=joblib): Hydra checks it
            continue
        value = arg.split("=", 1)[1]
        if key not in keys and (new := renamed_key(key)) is not None:
            raise ConfigError(f"{key} is now {new}: write `{new}={value}`.")
        if key not in keys:
            raise ConfigError(f"{key} is not a config key: {_nearest(key, value, keys)}")
        if keys[key] and any(isinstance(v, str) and v in ("None", "none") for v in override_values(o)):
            means = NULL_MEANS.get(key, "leaves it unset")
            raise ConfigError(f"{arg}: write `{key}=null` ({means}); `None` is read as the text 'None'.")


def _nearest(key: str, value: str, keys: dict[str, bool]) -> str:
    """'did you mean' the closest key within the deepest section of ``key`` that exists, else that section's keys."""
    parts = key.split(".")
    depth = max(i for i in range(len(parts)) if i == 0 or ".".join(parts[:i]) in keys)
    section = ".".join(parts[:depth])
    prefix = section + "." if section else ""
    below = [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]
    near = difflib.get_close_matches(".".join(parts[depth:]), below, n=1, cutoff=0.75)
    if near:
        return f"did you mean `{prefix}{near[0]}`? (`{prefix}{near[0]}={value}`)"
    children = sorted(k for k in below if "." not in k)
    return f"the keys {'under ' + section if section else 'at the top'} are {', '.join(children)}."


def check_sweep_presets(args: list[str]) -> None:
    """``experiment=<name>`` without ``-m`` would silently train one job of the sweep it defines."""
    if "-m" in args or "--multirun" in args:
        return
    for arg in args:
        o = _parse(arg)
        if o is not None and o.key_or_group in SWEEP_GROUPS and not o.is_delete():
            without_run_dir = [a for a in args if not a.lstrip("+").startswith("hydra.run.dir=")]  # -m: sweep dir
            raise ConfigError(f"{arg} defines a sweep, which runs with -m (without it only one job would run). "
                              f"Run:\n    {commands.launch(without_run_dir, multirun=True)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        av_td3.config.check_group_overrides(args)
        check_override_keys(args)
        check_override_types(args)
        check_sweep_presets(args)
        av_td3.config.check_output_dir(args)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from av_td3.sweep import missing_launcher_plugin

    if err := missing_launcher_plugin(args):  # e.g. launcher=ray without its plugin: name the pip package
        sys.exit(err)
    try:
        main()
    except SystemExit as e:
        # Hydra prints an error it meets before handing over a composed config (a value of the wrong type, a
        # missing group option, an override it cannot apply) and exits 1: each is a configuration mistake.
        if e.code == 1 and not _task_started and not isinstance(e, SweepIncomplete):
            sys.exit(EXIT_CONFIG)
        raise
