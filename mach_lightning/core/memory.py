"""Bytes held in flight: tensors reachable through containers, and what stored graphs saved."""

from __future__ import annotations

from typing import Any

import torch


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
    return sum(tensor_storages(obj, seen).values())


def tensor_storages(obj: Any, seen: dict[int, int] | None = None) -> dict[int, int]:
    """The storages (data pointer -> bytes) of every tensor reachable, added to `seen`'s."""
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
    return seen


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached(v) for v in value)
    return value
