"""Building blocks of the MACH family: teachers that consume a neighbour's embedding, students.

A MACH component (`MachComponent`) is a whole backbone network, the *teacher* f_i, whose input is
the raw input x fused with a neighbour's embedding e (or its student's imitation of e); its final
linear layer is the *target head*, and the activation entering that layer is the component's own
*embedding*. The *student* s_i(x) learns to reproduce the neighbour's embedding from x alone, so
the component can run without its neighbour: standalone, F_i(x) = head_i(f_i(x, s_i(x))).

Fusion: MLP inputs are flattened and the embedding appended; image inputs to convolutional
backbones get the embedding as extra channels, constant over the image. Students: for the MLP, a
small MLP (mach.student_width x mach.student_depth, then the embedding layer, ReLU like the
teacher's embedding); for convolutional backbones, the same backbone with the embedding as its
output (then ReLU). The rule wiring these together is methods/mach_base.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.core.blocks import Component
from mach_lightning.nets import BACKBONES


def flat_fusion(backbone: str, input_shape: tuple) -> bool:
    """MLPs take the embedding appended to the flat input; conv nets as constant channels."""
    return backbone == "mlp" or len(input_shape) != 3


def fused_input_shape(backbone: str, input_shape: tuple, extra: int) -> tuple:
    if flat_fusion(backbone, input_shape):
        return (math.prod(input_shape) + extra,)
    return (input_shape[0] + extra, *input_shape[1:])


def fuse(x: torch.Tensor, embedding: torch.Tensor | None, flat: bool) -> torch.Tensor:
    """x with the embedding attached (see fused_input_shape); x itself when there is none."""
    if embedding is None:
        return x
    if flat:
        return torch.cat([x.flatten(1), embedding], dim=1)
    planes = embedding[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return torch.cat([x, planes], dim=1)


def final_linear(block: nn.Module) -> nn.Linear:
    """The last nn.Linear of a (nested) Sequential backbone: its target head."""
    while not isinstance(block, nn.Linear):
        block = list(block.children())[-1]
    return block


def embed_through(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Run a (nested) Sequential backbone up to its final nn.Linear: the embedding that enters it.

    The head stays inside the block (same parameter names as `sync`), and is applied separately.
    """
    while not isinstance(block, nn.Linear):
        children = list(block.children())
        for module in children[:-1]:
            h = module(h)
        block = children[-1]
    return h


class EmbeddingOf(nn.Module):
    """`embed_through(block, h)` as a module with the block's parameter names (functional_call)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return embed_through(self.block, h)


def build_student(model_cfg, mach_cfg, input_shape: tuple, out_dim: int) -> nn.Module:
    """A network from x alone to an embedding of size out_dim (ReLU, like the teacher's)."""
    if model_cfg.backbone == "mlp":
        widths = [math.prod(input_shape), *[mach_cfg.student_width] * mach_cfg.student_depth]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], out_dim), nn.ReLU())
    units = BACKBONES[model_cfg.backbone](model_cfg, tuple(input_shape), out_dim)
    return nn.Sequential(*units, nn.ReLU())


class MachComponent(Component):
    """Teacher (block, ending in the target head), and a student when it has a neighbour."""

    def __init__(self, block: nn.Module, index: int, student: nn.Module | None, flat: bool):
        super().__init__(block, index)
        self.student = student
        self.flat = flat

    @property
    def embedding_dim(self) -> int:
        return final_linear(self.block).in_features

    def embed(self, x: torch.Tensor, neighbour: torch.Tensor | None) -> torch.Tensor:
        return embed_through(self.block, fuse(x, neighbour, self.flat))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return final_linear(self.block)(embedding)

    def imitate(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.student is None else self.student(x)

    def forward(self, x, neighbour=None, use_student: bool = False) -> torch.Tensor:
        """The embedding; use_student: the student's imitation stands in for the neighbour."""
        return self.embed(x, self.imitate(x) if use_student else neighbour)


def build_mach_component(
    cfg, input_shape: tuple, num_classes: int, index: int, neighbour_dim: int
) -> MachComponent:
    """Teacher for x fused with a neighbour_dim embedding (0: none, no student), and its student."""
    flat = flat_fusion(cfg.model.backbone, input_shape)
    shape = fused_input_shape(cfg.model.backbone, input_shape, neighbour_dim)
    block = nn.Sequential(*BACKBONES[cfg.model.backbone](cfg.model, shape, num_classes))
    student = None
    if neighbour_dim:
        student = build_student(cfg.model, cfg.mach, input_shape, neighbour_dim)
    return MachComponent(block, index, student, flat)


def teacher_embedding_dim(cfg, input_shape: tuple, num_classes: int) -> int:
    """The embedding size a teacher of this config produces (its head's input size)."""
    return build_mach_component(cfg, input_shape, num_classes, 0, 0).embedding_dim


def distillation_loss(imitation: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The student's loss: mean squared error to the (detached) neighbour embedding."""
    return F.mse_loss(imitation, embedding.detach())


def reachable_nodes(neighbours, i: int) -> set[int]:
    """Node i and every node it needs (its neighbours, theirs, ...) for its wired output."""
    needed, todo = set(), [i]
    while todo:
        j = todo.pop()
        if j not in needed:
            needed.add(j)
            todo.extend(neighbours(j))
    return needed


class Standalone(nn.Module):
    """Component i with its student: the deployable model, F_i(x) = head(f_i(x, s_i(x)))."""

    def __init__(self, component: MachComponent):
        super().__init__()
        self.component = component

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.component
        return c.classify(c.embed(x, c.imitate(x)))
