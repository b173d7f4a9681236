"""Weights of a component: live, cloned at a forward (stash), stashed back in (a rebuild).

An optimizer step updates parameters in place and bumps their version counters, so a stored graph
that saved the parameters themselves would fail at its late backward ("modified by an inplace
operation"). A graph built through `p.clone()` saved the clone, which nothing modifies;
CloneBackward routes the gradient to `p` untouched: the gradient at the weights of the forward.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn


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
def frozen_buffers(module: nn.Module | list[torch.Tensor]) -> Iterator[None]:
    """Run an extra forward (recompute, probe) without moving BatchNorm's running statistics.

    `module` may be the list of its buffers, found once: a replay every step should not walk
    the module tree each time (a quarter of a millisecond for K nodes)."""
    buffers = list(module.buffers()) if isinstance(module, nn.Module) else module
    if not buffers:
        yield
        return
    saved = [(b, b.detach().clone()) for b in buffers]
    try:
        yield
    finally:
        # Through .data: a graph of the forward before may have saved a buffer (BatchNorm in
        # eval-mode paths); an in-place copy on the tensor itself would bump its version counter
        # and fail that graph's backward ("modified by an inplace operation").
        for buffer, value in saved:
            buffer.data.copy_(value)
