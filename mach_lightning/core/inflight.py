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
storages plus the activations saved by stored graphs, read off the graphs when asked: hooks on
saved tensors during every forward would cost more time than the rest of the bookkeeping).
"""

from __future__ import annotations

import contextlib
import weakref
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
            out = item.get("_out")
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                storages.update(graph_saved_storages(out))
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


def live_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """`dict(module.named_parameters())`, from the cached slots (no module walk per step)."""
    return {name: owner._parameters[attr] for owner, attr, name in _parameter_slots(module)}


def cloned_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the parameters that a stored graph may save safely across in-place updates."""
    return {name: p.clone() for name, p in live_params(module).items()}


def stashed_params(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters with the snapshot's values whose gradient still flows to the live parameters.

    `w + (p - p.detach())` equals w exactly and has d/dp = identity: the gradient at the stashed
    weights, accumulated into p.grad (and seen by DDP's hooks on p).
    """
    return {name: snapshot[name] + (p - p.detach()) for name, p in live_params(module).items()}


def functional_forward(module: nn.Module, weights: dict[str, torch.Tensor], *inputs):
    """module(*inputs) computed with `weights` in place of its parameters (buffers are the
    module's). `weights` must name every parameter as `named_parameters()` does (extra keys are
    ignored).

    What `torch.func.functional_call` does, for the one case needed here, without its per-call
    checks: those cost as much as a small component's forward, on every step of every component
    whose update is late.
    """
    slots = _parameter_slots(module)
    live = [owner._parameters[attr] for owner, attr, _ in slots]
    for owner, attr, name in slots:
        owner._parameters[attr] = weights[name]
    try:
        return module(*inputs)
    finally:
        for (owner, attr, _), parameter in zip(slots, live):
            owner._parameters[attr] = parameter


_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owning submodule, attribute, name in named_parameters()) for every parameter slot; tied
    parameters share a name. Cached: a component's structure does not change while it trains."""
    if module not in _SLOTS:
        names = {id(p): n for n, p in module.named_parameters()}
        _SLOTS[module] = [
            (owner, attr, names[id(p)])
            for _, owner in module.named_modules(remove_duplicate=False)
            for attr, p in owner._parameters.items()
            if p is not None
        ]
    return _SLOTS[module]


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


def graph_saved_storages(output: torch.Tensor) -> dict[int, int]:
    """Storages (data pointer -> bytes) that the autograd graph behind `output` saved for backward.

    Walks the graph's nodes and reads their `_saved_*` tensors (the inputs, weight clones and
    activations each op keeps); the leaves' `variable`s are the live parameters, not in flight.
    """
    storages: dict[int, int] = {}
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in _saved_attributes(type(node)):
            try:
                saved = getattr(node, name)
            except RuntimeError:  # freed by a backward already run: no longer held
                continue
            for value in _tensors_in(saved):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return storages


_SAVED_ATTRIBUTES: dict[type, list[str]] = {}


def _saved_attributes(node_type: type) -> list[str]:
    """The `_saved_*` attributes of an autograd node class (dir() is slow; the class says it)."""
    if node_type not in _SAVED_ATTRIBUTES:
        _SAVED_ATTRIBUTES[node_type] = [n for n in dir(node_type) if n.startswith("_saved_")]
    return _SAVED_ATTRIBUTES[node_type]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


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
