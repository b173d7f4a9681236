"""What is in flight between components: delay queues, replay buffers and weight snapshots.

A component whose update is d steps late must hold, for each of the d batches in flight, what it
needs to compute that update later. Two ways to hold it (`topology.grad_mode`):

  stash      the autograd graph of the batch's forward, built with a *clone* of the weights.
             An optimizer step updates the parameters in place and bumps their version counters,
             so a graph that saved the parameters themselves would fail at backward ("modified by
             an inplace operation"). A graph built through `p.clone()` saved the clone, which
             nothing modifies; CloneBackward routes the gradient to `p` untouched. The gradient is
             therefore exactly the gradient at the weights of the batch's forward (PipeDream's
             weight stashing, Decoupled Parallel Backprop's stored graph). No extra forward.
             Memory per in-flight batch and component: its saved activations + one copy of its
             weights + the gradient message. A checkpoint keeps the input and the weight copy; the
             graph is rebuilt from them after a resume (`stashed_params`), bit for bit.
  recompute  only the batch's input; at backward time the forward is redone with the current
             weights (Features Replay). Memory per in-flight batch and component: its input +
             the gradient message. Cost: one extra forward of the delayed components per step.

Memory is proportional to the delays and nothing else; `held_bytes()` counts it (unique tensor
storages plus the activations saved by stored graphs, measured when they were built).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

Item = dict[str, Any]


class DelayQueue:
    """Items keyed by a tuple of ints (e.g. (batch, component)), each due at an integer step.

    Keys starting with "_" hold transient objects (stored graphs) and are not checkpointed;
    everything else (tensors, ints, lists, dicts of tensors) goes into `state_dict()`.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[int, ...], Item] = {}

    def push(self, key: tuple[int, ...], due: int, item: Item) -> None:
        self.items[key] = {**item, "due": int(due)}

    def due(self, step: int) -> list[tuple[tuple[int, ...], Item]]:
        """The items due at `step`, oldest key first (a fixed order keeps sums reproducible)."""
        return sorted((k, v) for k, v in self.items.items() if v["due"] == step)

    def get(self, key: tuple[int, ...]) -> Item | None:
        return self.items.get(key)

    def pop(self, key: tuple[int, ...]) -> Item:
        return self.items.pop(key)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> list[dict[str, Any]]:
        return [
            {"key": list(k), **{f: _detached(v) for f, v in item.items() if not f.startswith("_")}}
            for k, item in sorted(self.items.items())
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.items = {}
        for entry in state:
            entry = dict(entry)
            self.items[tuple(int(k) for k in entry.pop("key"))] = entry

    def held_bytes(self) -> int:
        """Bytes of the in-flight state and of what stored graphs saved, each storage once."""
        storages: dict[int, int] = {}
        for item in self.items.values():
            storages.update(item.get("_saved", {}))
        return tensor_bytes(list(self.items.values()), storages)


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
            "entries": [{k: _detached(v) for k, v in e.items()} for e in self.entries],
            "next_slot": self.next_slot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries, self.next_slot = list(state["entries"]), int(state["next_slot"])

    def held_bytes(self) -> int:
        return tensor_bytes(self.entries)


# ----- weights: live, cloned (stash at forward time), stashed (rebuilt after a resume) -----


def cloned_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the parameters that a stored graph may save safely across in-place updates."""
    return {name: p.clone() for name, p in module.named_parameters()}


def stashed_params(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters with the snapshot's values whose gradient still flows to the live parameters.

    `w + (p - p.detach())` equals w exactly and has d/dp = identity: the gradient at the stashed
    weights, accumulated into p.grad (and seen by DDP's hooks on p).
    """
    return {name: snapshot[name] + (p - p.detach()) for name, p in module.named_parameters()}


def functional_forward(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor):
    """module(x) computed with `weights` in place of its parameters (buffers are the module's)."""
    return torch.func.functional_call(module, weights, (x,))


@contextlib.contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Run an extra forward (recompute, probe) without moving BatchNorm's running statistics."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def record_saved_storages(storages: dict[int, int]) -> Iterator[None]:
    """Record in `storages` (data pointer -> bytes) what autograd saves for backward in the block.

    Parameters (or their clones) and inputs the graph saves are included: the graph holds them.
    """

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def tensor_bytes(obj: Any, seen: dict[int, int] | None = None) -> int:
    """Bytes of every tensor reachable through dicts, lists and tuples, each storage once.

    `seen` (data pointer -> bytes) adds storages known from elsewhere, e.g. saved activations.
    """
    seen = dict(seen or {})

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(obj)
    return sum(seen.values())


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value
