"""Keys that moved when each method got its own config section, and the migration of saved configs.

Before, `topology` held every stale-gradient setting, flat. Now `topology` holds only `name` and
each method reads its own section. A config being written now (a YAML file, an override) that uses
an old key stops with the new one's name; a config saved before (a checkpoint's hyper_parameters,
a run's config.yaml, a W&B run) is migrated when read, so old runs resume and report as before.

The readers below are the methods that read each old key before the move: a closed, historical
list (a new method never had a flat key), so it is spelt out here rather than looked up in the
method registry, which this package must not import.
"""

from __future__ import annotations

import copy
from typing import Any

MACH_TOPOLOGIES = ("mach_single", "mach_seq", "mach_kgraph")

# old key -> (new key, the topologies that read the old one, those topologies in words) per reader
MOVED_KEYS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "topology.grad_mode": (
        ("delayed.grad_mode", ("delayed",), "delayed"),
        ("mach.grad_mode", MACH_TOPOLOGIES, "the MACH topologies"),
    ),
    "topology.dcasgd_lambda": (("delayed.dcasgd_lambda", ("delayed",), "delayed"),),
    "topology.dcasgd_lr_scaling": (("delayed.dcasgd_lr_scaling", ("delayed",), "delayed"),),
    "topology.aux_head": (("local.aux_head", ("local",), "local"),),
    "topology.aux_hidden": (("local.aux_hidden", ("local",), "local"),),
    "topology.async_buffer": (("local.async_buffer", ("local",), "local"),),
}


def moved_message(old: str) -> str:
    """'topology.grad_mode moved: use delayed.grad_mode (for delayed) or mach.grad_mode (...)'."""
    uses = " or ".join(f"{new} (for {who})" for new, _, who in MOVED_KEYS[old])
    return f"{old} moved: use {uses}"


def moved_keys_in(keys: list[str]) -> list[str]:
    """The old keys among these flattened keys, in order."""
    return [k for k in keys if k in MOVED_KEYS]


def migrate_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (nested dict) with its old flat topology keys moved to their sections.

    Each old value goes to the section of the topology the run trained (topology.grad_mode of a
    mach_seq run becomes mach.grad_mode); one its topology never read is dropped, as it meant
    nothing to that run. A new key already present wins. The input is left unchanged."""
    topology = config.get("topology") if isinstance(config, dict) else None
    if not isinstance(topology, dict) or not any(f"topology.{k}" in MOVED_KEYS for k in topology):
        return config
    out = copy.deepcopy(config)
    name = out["topology"].get("name")
    for old, targets in MOVED_KEYS.items():
        leaf = old.split(".", 1)[1]
        if leaf not in out["topology"]:
            continue
        value = out["topology"].pop(leaf)
        for new, readers, _ in targets:
            if name in readers:
                section, key = new.split(".", 1)
                node = out.setdefault(section, {})
                if isinstance(node, dict):
                    node.setdefault(key, value)
    return out
