"""Components: the unit of decoupling. A block of layers with its own optimizer and scheduler.

Topologies wire components together (and delay what flows between them); every component is
trained by exactly one optimizer, so "one optimizer step per component per batch" is literal.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class Component(nn.Module):
    """A block of layers (plain nn.Module) at position `index` in a chain of components.

    `head` is an optional auxiliary classifier (local losses, per-component evaluation); it is
    trained by the component's own optimizer, so it travels with the component's parameters.
    """

    def __init__(self, block: nn.Module, index: int, head: nn.Module | None = None):
        super().__init__()
        self.index = index
        self.block = block
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def build_optimizer(params: Iterable[nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    """The optimizer named by optim.name over `params`."""
    params = list(params)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim_cfg.lr,
            momentum=optim_cfg.momentum,
            weight_decay=optim_cfg.weight_decay,
        )
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    return torch.optim.Adam(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_epochs: int):
    """An epoch-level learning-rate scheduler, or None for optim.scheduler=none."""
    if optim_cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
    if optim_cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, optim_cfg.step_size, optim_cfg.gamma)
    return None
