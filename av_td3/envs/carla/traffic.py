"""Reproducible NPC traffic: which blueprints, which spawn points, drawn from the episode's seed.

The NPCs are destroyed and spawned again at every reset, so the episode seed alone decides their spawn points and
blueprints (a Traffic Manager seeds each vehicle's random generator when the vehicle is registered with it, so
re-seeding it has no effect on NPCs that already exist). Blueprints are sorted by id before the draw: the server
lists them in no fixed order.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from av_td3.config import ConfigError

log = logging.getLogger(__name__)

# base_type values of CARLA 0.9.16's vehicle blueprints.
BASE_TYPES = ("car", "van", "truck", "bus", "motorcycle", "bicycle")


def check_types(types: list[str]) -> None:
    unknown = [t for t in types if t not in BASE_TYPES]
    if unknown or not types:
        raise ConfigError(f"env.carla.npc_types={list(types)} is not valid: give one or more of "
                          f"{', '.join(BASE_TYPES)} (e.g. `env.carla.npc_types=[car,van]`).")


def npc_blueprints(library: Any, types: list[str]) -> list[Any]:
    """Vehicle blueprints whose ``base_type`` is in ``types``, sorted by id."""
    chosen = [bp for bp in library.filter("vehicle.*")
              if bp.has_attribute("base_type") and bp.get_attribute("base_type") in types]
    if not chosen:
        raise ConfigError(f"env.carla.npc_types={list(types)}: the server has no vehicle blueprint of these types.")
    return sorted(chosen, key=lambda bp: bp.id)


def spawn_npcs(client: Any, command: Any, blueprints: list[Any], points: list[Any], count: int, tm_port: int,
               rng: np.random.Generator) -> list[int]:
    """Spawn ``count`` autopilot NPCs on ``points`` (drawn in ``rng``'s order, each with a blueprint drawn from
    ``blueprints``), in batches: a point that is occupied fails on the server, and the next points in the order
    are tried until ``count`` stand or the points run out. Returns the actor ids, in spawn order."""
    order = [int(i) for i in rng.permutation(len(points))]
    ids: list[int] = []
    errors: list[str] = []
    while len(ids) < count and order:
        take, order = order[:count - len(ids)], order[count - len(ids):]
        batch = []
        for i in take:
            bp = blueprints[int(rng.integers(len(blueprints)))]
            bp.set_attribute("role_name", "autopilot")
            batch.append(command.SpawnActor(bp, points[i]).then(
                command.SetAutopilot(command.FutureActor, True, tm_port)))
        for response in client.apply_batch_sync(batch, False):
            if response.has_error():
                errors.append(response.error)
            else:
                ids.append(int(response.actor_id))
    if len(ids) < count:
        log.warning("env.npcs=%d but only %d NPCs could be spawned on %d free spawn points (first error: %s).",
                    count, len(ids), len(points), errors[0] if errors else "none")
    return ids
