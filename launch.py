"""Entry point: ``python launch.py [overrides]`` trains one run; ``python launch.py -m ...`` runs a sweep.

Returns the objective (final evaluation return) for Hydra sweepers such as Optuna.
"""

from __future__ import annotations

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

import av_td3.config  # noqa: E402,F401  (registers the config schema)

log = logging.getLogger("av_td3")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from av_td3.app import run_job

    hc = HydraConfig.get()
    objective, exit_code = run_job(cfg, Path(hc.runtime.output_dir))
    # A single run reports failure through its exit code; a sweep goes on past a failed job (its summary.json
    # records why) but stops entirely when the user interrupts it (exit code 128 + signal).
    if exit_code and (hc.mode != RunMode.MULTIRUN or exit_code >= 128):
        logging.shutdown()
        sys.exit(exit_code)
    return objective


if __name__ == "__main__":
    try:
        av_td3.config.check_group_overrides(sys.argv[1:])
        av_td3.config.check_output_dir(sys.argv[1:])
    except av_td3.config.ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    from av_td3.sweep import missing_launcher_plugin

    if err := missing_launcher_plugin(sys.argv[1:]):  # e.g. launcher=ray without its plugin: name the pip package
        sys.exit(err)
    main()
