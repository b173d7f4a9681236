"""Gradient synthesizers: small nets predicting dL/dh from an activation h (Jaderberg et al. 2016).

A synthesizer sits on the boundary after a component. It sees the component's output h (detached:
training it never moves the component) and, for cDNI, the labels, and predicts the *per-example*
gradient B * dL/dh, where L is the batch-mean loss and B the batch size. Predicting the per-example
gradient keeps the regression target's size independent of the batch size; the component applies
prediction / B, which is what backprop would hand it. The last layer starts at zero, so every
synthesizer begins by predicting a zero gradient (the paper's choice: no harm before it has learnt).

Flat activations (MLP) get an MLP synthesizer; image-shaped ones (C, H, W) a fully convolutional
one with 3x3 convolutions that keeps the shape. Labels enter as a one-hot vector concatenated to h
(MLP) or as one-hot channels broadcast over the image (conv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.core.weights import frozen_buffers


class GradientSynthesizer(nn.Module):
    """Predicts B * dL/dh for activations of `activation_shape` (without the batch dimension)."""

    def __init__(self, activation_shape, hidden: int, layers: int, num_classes: int = 0):
        super().__init__()
        self.activation_shape = tuple(activation_shape)
        self.num_classes = num_classes  # 0: unconditioned (DNI); > 0: label-conditioned (cDNI)
        self.is_conv = len(self.activation_shape) == 3
        if self.is_conv:
            channels = self.activation_shape[0]
            widths = [channels + num_classes, *[hidden] * layers, channels]
            make = lambda a, b: nn.Conv2d(a, b, 3, padding=1)  # noqa: E731
        else:
            features = math.prod(self.activation_shape)
            widths = [features + num_classes, *[hidden] * layers, features]
            make = nn.Linear
        modules: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            modules += [make(a, b), nn.ReLU()]
        last = make(widths[-2], widths[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*modules, last)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        inputs = h if self.is_conv else h.flatten(1)
        if self.num_classes:
            onehot = F.one_hot(y, self.num_classes).to(h.dtype)
            if self.is_conv:
                onehot = onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])
            inputs = torch.cat([inputs, onehot], dim=1)
        return self.net(inputs).view_as(h)


def synthesizer_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of the predicted per-example gradient, summed over features, batch mean."""
    return (prediction - target).pow(2).sum() / prediction.shape[0]


def synthesizer_loss_grad(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d synthesizer_loss / d prediction, for injecting the regression inside a backward pass."""
    return 2.0 * (prediction - target) / prediction.shape[0]


@torch.no_grad()
def boundary_shapes(components: nn.ModuleList, input_shape) -> list[tuple[int, ...]]:
    """Shape (without batch) of each component's output but the last: where synthesizers sit."""
    shapes, h = [], torch.zeros(2, *input_shape)
    with frozen_buffers(components):
        for component in components[:-1]:
            h = component(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes
