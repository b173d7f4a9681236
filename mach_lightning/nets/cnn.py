"""Small convolutional backbones: a plain CNN and a ResNet, as units that split into components."""

from __future__ import annotations

from torch import nn


def _conv_stage(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    )


def _classifier(in_ch: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))


def cnn_units(model_cfg, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """Conv-BN-ReLU-pool stages of widths model.channels, then pooled linear classifier."""
    widths = [input_shape[0], *model_cfg.channels]
    units = [_conv_stage(a, b) for a, b in zip(widths, widths[1:])]
    units.append(_classifier(widths[-1], num_classes))
    return units


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def resnet_units(model_cfg, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """A stem, a basic block per width in model.channels (stride 2 after the first), classifier."""
    widths = list(model_cfg.channels)
    stem = nn.Sequential(
        nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    )
    blocks = [BasicBlock(widths[0], widths[0], 1)]
    blocks += [BasicBlock(a, b, 2) for a, b in zip(widths, widths[1:])]
    return [stem, *blocks, _classifier(widths[-1], num_classes)]
