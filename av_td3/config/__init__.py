"""The configuration: :mod:`~av_td3.config.schema` (typed dataclasses, the single source of every key, its default
and its valid range; registered with Hydra on import) and :mod:`~av_td3.config.checks` (validation and the
command-line pre-checks). Everything is importable from here: ``from av_td3.config import Config, validate``."""

from av_td3.config.checks import (CONF_DIR, NULL_MEANS, check_group_overrides, check_output_dir, schema_keys,
                                  to_config, validate)
from av_td3.config.schema import (RENAMED_KEYS, AgentConfig, BevConfig, CameraConfig, CarlaConfig, ClipConfig,
                                  Config, ConfigError, CsvConfig, EnvConfig, ImageConfig, LoggerConfig, LrConfig,
                                  MlflowConfig, MonitorConfig, PidConfig, PlanConfig, RewardConfig, RouteConfig,
                                  TensorboardConfig, TrainerConfig, WandbConfig, one_of, register_configs,
                                  renamed_key, rng)

__all__ = ["CONF_DIR", "NULL_MEANS", "RENAMED_KEYS", "AgentConfig", "BevConfig", "CameraConfig", "CarlaConfig",
           "ClipConfig", "Config", "ConfigError", "CsvConfig", "EnvConfig", "ImageConfig", "LoggerConfig", "LrConfig",
           "MlflowConfig", "MonitorConfig", "PidConfig", "PlanConfig", "RewardConfig", "RouteConfig",
           "TensorboardConfig",
           "TrainerConfig", "WandbConfig", "check_group_overrides", "check_output_dir", "one_of", "register_configs",
           "renamed_key", "rng", "schema_keys", "to_config", "validate"]
