"""The topology registry: `@register_topology`, `list_topologies()`, `create_topology(cfg, ...)`.

Each topology is one file in this package, a `TopologyModule` subclass with a `name`, and its own
settings: a dataclass registered as a config section (`@config_section("delayed")`, read as
`cfg.delayed`), named where the topology registers: `@register_topology(section=DelayedConfig)`.
Importing this package registers them all; `load_config` composes their sections into the schema,
and the tests parametrise over `list_topologies()`.
"""

from __future__ import annotations

from mach_lightning.config import register_choices, register_section, section_name

TOPOLOGIES: dict[str, type] = {}


def register_topology(cls: type | None = None, *, section: type | None = None):
    """Class decorator: make a TopologyModule subclass available under its `name`.

    `@register_topology(section=DelayedConfig)` also records that it reads that registered
    config section (`cfg.delayed`); a section may be shared (synth: dni and cdni)."""

    def register(cls: type) -> type:
        if not getattr(cls, "name", ""):
            raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered.")
        taken = TOPOLOGIES.get(cls.name)
        if taken is not None and taken is not cls:
            raise ValueError(f"Topology name '{cls.name}' is already taken by {taken}.")
        if section is not None:
            register_section(section_name(section), section, methods=(cls.name,))
        cls.config_section = None if section is None else section_name(section)
        TOPOLOGIES[cls.name] = cls
        return cls

    return register if cls is None else register(cls)


def list_topologies() -> list[str]:
    return sorted(TOPOLOGIES)


def rule_class(name: str) -> type:
    """The registered rule class of method `name` (a runtime builds and drives it)."""
    return TOPOLOGIES[name]


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
