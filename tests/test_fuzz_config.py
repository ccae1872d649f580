"""Random command-line overrides: either a clean validation error naming the key, or a valid config."""

from __future__ import annotations

import dataclasses
import math

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from av_td3.config import Config, ConfigError, check_group_overrides, to_config
from tests.test_config import CONF


def leaf_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(value, f"{prefix}{f.name}.")
        elif f.name != "logger":
            keys.append(prefix + f.name)
    return keys


KEYS = leaf_keys(Config(agent=Config().agent)) + ["agent.nope", "env.image.depth", "trainer", "env", "agent"]
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f) if math.isfinite(f) else str(f)),
    st.sampled_from(["null", "true", "false", "auto", "cpu", "cuda", "shared", "separate", "stop", "skip", "td3",
                     "racetrack", "highway", "carla", "[1,2]", "{a: 1}", "''", "1e30", "-0.0", "nan", "inf"]),
    st.text(alphabet="abcxyz019._-", min_size=1, max_size=8),
)
GROUPS = st.sampled_from(["", "env=carla", "env=highway", "agent=ddpg", "agent=pid", "debug=smoke",
                          "env=gta", "agent=ppo"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4), group=GROUPS)
def test_random_overrides_give_a_clean_error_or_a_valid_config(overrides, group) -> None:
    args = [f"{k}={v}" for k, v in overrides] + ([group] if group else [])
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        try:
            check_group_overrides(args)  # what launch.py runs before Hydra
            cfg = to_config(compose("config", overrides=args))
        except ConfigError as e:
            key = str(e).split("=")[0].split(" ")[0]
            assert key in {k for k, _ in overrides} | {"agent", "env"} or "agent.batch_size" in str(e) \
                or "policy_frequency" in str(e) or "logger" in str(e), str(e)
            return
        except (ConfigCompositionException, MissingConfigException) as e:
            assert str(e)
            return
        except HydraException as e:  # override grammar errors (e.g. an unbalanced bracket in a value)
            assert "override" in str(e).lower() or "error" in str(e).lower()
            return
    assert isinstance(cfg, Config)
    assert cfg.agent.batch_size <= cfg.agent.buffer_size
    assert cfg.agent.clip.actor is None or cfg.agent.clip.actor > 0
