"""Plain `nn.Module` backbones, each an ordered list of units that splits into K blocks."""

from __future__ import annotations

from torch import nn

from mach_lightning.config import ConfigError
from mach_lightning.nets.cnn import cnn_units, resnet_units
from mach_lightning.nets.mlp import mlp_units

BACKBONES = {"mlp": mlp_units, "cnn": cnn_units, "resnet": resnet_units}


def split_units(units: list[nn.Module], num_components: int) -> list[nn.Sequential]:
    """Split units into K contiguous blocks, as even as possible (earlier blocks take extras)."""
    if num_components > len(units):
        raise ConfigError(
            f"model.num_components={num_components} is more than the {len(units)} layers this "
            f"backbone has; use at most {len(units)} or a deeper backbone (a larger model.depth)."
        )
    base, extra = divmod(len(units), num_components)
    blocks, start = [], 0
    for i in range(num_components):
        size = base + (1 if i < extra else 0)
        blocks.append(nn.Sequential(*units[start : start + size]))
        start += size
    return blocks


def build_backbone(model_cfg, input_shape, num_classes: int) -> list[nn.Sequential]:
    """The backbone named by model.backbone, split into model.num_components blocks."""
    units = BACKBONES[model_cfg.backbone](model_cfg, tuple(input_shape), num_classes)
    return split_units(units, model_cfg.num_components)
