"""The topology registry: `@register_topology`, `list_topologies()`, `create_topology(cfg, ...)`.

Each topology is one file in this package, a `TopologyModule` subclass with a `name`; importing
this package registers them all, and the tests parametrise over `list_topologies()`.
"""

from __future__ import annotations

from mach_lightning.config import register_choices

TOPOLOGIES: dict[str, type] = {}


def register_topology(cls: type) -> type:
    """Class decorator: make a TopologyModule subclass available under its `name`."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered.")
    if cls.name in TOPOLOGIES and TOPOLOGIES[cls.name] is not cls:
        raise ValueError(f"Topology name '{cls.name}' is already taken by {TOPOLOGIES[cls.name]}.")
    TOPOLOGIES[cls.name] = cls
    return cls


def list_topologies() -> list[str]:
    return sorted(TOPOLOGIES)


def create_topology(cfg, input_shape: tuple, num_classes: int):
    """The topology named by cfg.topology.name, built for data of this shape and class count."""
    return TOPOLOGIES[cfg.topology.name](cfg, tuple(input_shape), num_classes)


register_choices("topology.name", list_topologies)

# Importing a topology module registers it. Keep this list in sync with the files here.
from mach_lightning.methods import (  # noqa: E402,F401
    delayed,
    dni,
    local,
    mach_kgraph,
    mach_seq,
    mach_single,
    sync,
)
