"""A replay buffer: the last M activations a component wrote, sampled by the component above.

Decoupled Greedy Learning's asynchronous variant (methods/local.py, `local.async_buffer`): a
component trains on a uniformly drawn stored activation of the one below it, so neither waits.
"""

from __future__ import annotations

from typing import Any

import torch

from mach_lightning.core.memory import detached, tensor_bytes

Item = dict[str, Any]


class ReplayBuffer:
    """A ring of the last `capacity` items, sampled uniformly with a caller-given generator."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.entries, self.next_slot = capacity, [], 0

    def append(self, item: Item) -> None:
        if len(self.entries) < self.capacity:
            self.entries.append(item)
        else:
            self.entries[self.next_slot] = item
        self.next_slot = (self.next_slot + 1) % self.capacity

    def sample(self, generator: torch.Generator) -> Item:
        index = int(torch.randint(len(self.entries), (1,), generator=generator))
        return self.entries[index]

    def __len__(self) -> int:
        return len(self.entries)

    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": [{k: detached(v) for k, v in e.items()} for e in self.entries],
            "next_slot": self.next_slot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries, self.next_slot = list(state["entries"]), int(state["next_slot"])

    def held_bytes(self) -> int:
        return tensor_bytes(self.entries)
