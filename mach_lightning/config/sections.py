"""Each method's own config section, registered next to the method and composed at load time.

A method declares its settings as a dataclass in its own file and registers it under a top-level
key, e.g. in mach_lightning/methods/delayed.py:

    @config_section("delayed")
    @dataclass
    class DelayedConfig:
        grad_mode: str = "stash"  # ...

    @register_topology(section=DelayedConfig)  # cfg.delayed is this method's
    class Delayed(TopologyModule): ...

`load_config` builds its schema with `compose(base)`: the base sections (config/schema.py) with
every registered section placed after `topology`. This module imports nothing of mach_lightning:
config is the bottom layer, so the methods above it fill this registry and it never imports them.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable


@dataclasses.dataclass
class Section:
    """One registered section: its key in the config, its dataclass, the methods that read it."""

    name: str
    schema: type
    methods: list[str] = dataclasses.field(default_factory=list)


SECTIONS: dict[str, Section] = {}


def _qualname(schema: type) -> str:
    return f"{schema.__module__}.{schema.__qualname__}"


def register_section(name: str, schema: type, methods: tuple[str, ...] = ()) -> type:
    """Make the dataclass `schema` the config section `cfg.<name>`, read by `methods`.

    Registering the same schema again only adds methods (synth is shared by dni and cdni)."""
    if not name.isidentifier():
        raise ValueError(f"Config section name '{name}' must be an identifier, e.g. 'delayed'.")
    if not dataclasses.is_dataclass(schema):
        raise TypeError(
            f"Config section '{name}': {schema!r} is not a dataclass; declare it with @dataclass."
        )
    known = SECTIONS.get(name)
    if known is not None and known.schema is not schema:
        raise ValueError(
            f"Config section '{name}' is already declared by {_qualname(known.schema)}; "
            f"give {_qualname(schema)} another name, or reuse that dataclass."
        )
    section = SECTIONS.setdefault(name, Section(name, schema))
    section.methods.extend(m for m in methods if m not in section.methods)
    return schema


def config_section(name: str) -> Callable[[type], type]:
    """Class decorator (above @dataclass): `register_section(name, the class)`."""
    return lambda schema: register_section(name, schema)


def section_name(schema: type) -> str:
    """The key a registered dataclass is composed under; a clear error when it is not one."""
    for section in SECTIONS.values():
        if section.schema is schema:
            return section.name
    raise ValueError(
        f"{_qualname(schema)} is not a registered config section: decorate it with "
        f"@config_section('NAME') (mach_lightning.config) before naming it in register_topology."
    )


def sections_of(method: str) -> list[Section]:
    """The sections a registered method reads, in name order."""
    return [s for _, s in sorted(SECTIONS.items()) if method in s.methods]


def compose(base: type, after: str = "topology") -> type:
    """`base` (a dataclass of sections) with every registered section, as one dataclass.

    The sections follow the field `after` (the key that picks the method), in name order, so a
    run's config.yaml reads the same whatever order the methods were imported in."""
    return _compose(base, after, tuple((n, s.schema) for n, s in sorted(SECTIONS.items())))


@functools.lru_cache(maxsize=16)  # keyed on the sections too: registering one recomposes
def _compose(base: type, after: str, sections: tuple[tuple[str, type], ...]) -> type:
    hints = typing.get_type_hints(base)  # real types: the composed class has no module to resolve
    fields = dataclasses.fields(base)
    taken = {f.name for f in fields}
    for name, schema in sections:
        if name in taken:
            raise ValueError(
                f"Config section '{name}' ({_qualname(schema)}) clashes with the base section "
                f"'{name}' of {_qualname(base)}; register it under another name."
            )
    added = [(name, schema, dataclasses.field(default_factory=schema)) for name, schema in sections]
    out = []
    for f in fields:
        out.append((f.name, hints[f.name], _same_default(f)))
        if f.name == after:
            out += added
    if after not in taken:
        out += added
    composed = dataclasses.make_dataclass(base.__name__, out)
    composed.__module__, composed.__doc__ = base.__module__, base.__doc__
    return composed


def _same_default(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)
