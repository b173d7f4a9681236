"""The MACH-style MLP: input -> depth x width (default 512-512) -> embedding -> classes."""

from __future__ import annotations

import math

from torch import nn


def _dense(in_features: int, out_features: int, first: bool) -> nn.Module:
    layers = [nn.Flatten()] if first else []
    layers += [nn.Linear(in_features, out_features), nn.ReLU()]
    return nn.Sequential(*layers)


def mlp_units(model_cfg, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """One unit per linear layer; each hidden unit is Linear+ReLU, the last is the classifier."""
    widths = [math.prod(input_shape), *[model_cfg.width] * model_cfg.depth, model_cfg.embedding_dim]
    units = [_dense(a, b, first=i == 0) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    units.append(nn.Linear(widths[-1], num_classes))
    return units
