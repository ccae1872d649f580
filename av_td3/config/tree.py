"""Walking a configuration tree, in one place: dotted keys (``agent.clip.actor``) for its leaves.

Two walkers, because a configuration comes in two kinds that hold different things:

- :func:`flatten` walks *values*: a config instance (the schema's dataclasses), a plain mapping (a config read
  back from JSON) or a ``DictConfig`` (read from ``.hydra/config.yaml``). Validation, the ignored-keys warning of
  :mod:`av_td3.envs.backends`, the sweep's skip check and ``compare`` all compare or check values through it.
- :func:`schema_fields` walks *types*: the schema's dataclass classes, where alone the declared type, whether a
  key takes null, its sections and each field's metadata (range, choices) are found, with no instance needed.

Imports nothing of av_td3 itself (the package's ``__init__`` loads the schema, which :mod:`av_td3.rundir` reads
anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``, in the tree's order. ``node``: a mapping, a ``DictConfig`` (resolved
    first) or a dataclass instance (its fields; a field holding a dataclass is a section). An empty mapping is a
    value of its own (``logger.csv: {}`` differs from ``logger.csv: null``)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        items: Any = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    else:
        items = node.items()
    out: dict[str, Any] = {}
    for key, value in items:
        if (isinstance(value, Mapping) and value) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class SchemaField(NamedTuple):
    key: str                        # dotted
    type: Any                       # the declared type, ``Optional[X]`` read as ``X``; a dataclass for a section
    nullable: bool                  # accepts null
    metadata: Mapping[str, Any]     # the field's range and choices (av_td3.config.schema.rng, one_of)


@functools.lru_cache(maxsize=None)
def schema_fields(cls: type, prefix: str = "") -> tuple[SchemaField, ...]:
    """Every key of the dataclass schema ``cls``, sections too (``agent.clip`` and ``agent.clip.actor``), in the
    schema's order."""
    hints = typing.get_type_hints(cls)
    found: list[SchemaField] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        nullable = type(None) in args
        inner = next((t for t in args if t is not type(None)), hint) if nullable else hint
        found.append(SchemaField(prefix + f.name, inner, nullable, f.metadata))
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):  # a section: its dataclass
            found += schema_fields(inner, f"{prefix}{f.name}.")
    return tuple(found)
