"""av-td3: TD3 from camera images in a driving simulator, with honest gradient-clipping metrics.

Importing the package registers the gymnasium id ``av_td3/Highway-v0``, so ``gym.make("av_td3/Highway-v0",
**env_config_fields)`` works after ``import av_td3``. The entry point is a string: the simulator (highway-env,
pygame) is imported by ``gym.make``, not here.
"""

from av_td3.machine import keep_freed_memory, prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: OpenMP reads its wait policy once, when it loads
keep_freed_memory()  # before torch allocates: glibc keeps freed tensor memory for reuse (10-15% of an update)

__version__ = "0.1.0"

HIGHWAY_ID = "av_td3/Highway-v0"


def _register_envs() -> None:
    import gymnasium as gym

    if HIGHWAY_ID not in gym.registry:  # av_td3.envs registers the same id; gymnasium warns on a second one
        gym.register(id=HIGHWAY_ID, entry_point="av_td3.envs.highway:from_kwargs")


_register_envs()
