"""MACH, single: one teacher with one student on top of an upstream network, F(x) = f0(x, s(x)).

The upstream is the configured backbone split into K-1 components (a sync-backprop chain with its
own head and loss, one optimizer per component); its embedding is the activation entering its
final linear layer. Component 0 is a MACH teacher consuming x and that embedding (or its student's
imitation, mach.use_student[0]); its student s(x) distils the upstream's embedding. The upstream is
co-trained (its own loss plus the teacher's gradient, delayed by d_1) or, with
mach.upstream_frozen, fixed; mach.upstream_ckpt starts it from a `sync` run with K-1 components
(same backbone). Evaluation: acc_c0 is the teacher with its student, acc_c1 the upstream alone,
val/acc the teacher as trained.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import OmegaConf
from torch import nn

from mach_lightning.checkpoint_io import CheckpointError, load_checkpoint
from mach_lightning.config import ConfigError
from mach_lightning.core.blocks import Component
from mach_lightning.core.mach_blocks import (
    EmbeddingOf,
    build_mach_component,
    embed_through,
    final_linear,
)
from mach_lightning.core.weights import functional_forward
from mach_lightning.methods import register_topology
from mach_lightning.methods.mach_base import Edges, MachConfig, MachRule
from mach_lightning.nets import build_backbone

UPSTREAM = 1  # the upstream's node index; its components are self.components[1:]


@register_topology(section=MachConfig)
class MachSingle(MachRule):
    """Node 0: teacher f0(x, e) + student s(x) ~ e; node 1: the upstream chain producing e."""

    name = "mach_single"

    def build_components(self) -> nn.ModuleList:
        k = self.num_components
        if k < 2:
            raise ConfigError(
                "mach_single needs model.num_components >= 2: one teacher and an "
                "upstream of K-1 components, e.g. model.num_components=2."
            )
        upstream_model = OmegaConf.merge(self.cfg.model, {"num_components": k - 1})
        blocks = build_backbone(upstream_model, self.input_shape, self.num_classes)
        upstream = [Component(block, i + 1) for i, block in enumerate(blocks)]
        dim = final_linear(blocks[-1]).in_features
        teacher = build_mach_component(self.cfg, self.input_shape, self.num_classes, 0, dim)
        components = nn.ModuleList([teacher, *upstream])
        if self.cfg.mach.upstream_ckpt:
            load_upstream(components, self.cfg.mach.upstream_ckpt)
        if self.cfg.mach.upstream_frozen:
            for component in upstream:
                component.requires_grad_(False)
        return components

    def edges(self) -> Edges:
        return Edges(neighbours=((UPSTREAM,), ()), order=(UPSTREAM, 0))

    def node_modules(self, i: int) -> list[nn.Module]:
        return list(self.components[1:]) if i == UPSTREAM else [self.components[0]]

    def embed(self, i, x, neighbour, weights=None, use_student=False) -> torch.Tensor:
        if i != UPSTREAM:
            return super().embed(i, x, neighbour, weights, use_student)
        upstream = self.components[1:]
        if weights is None:
            for component in upstream[:-1]:
                x = component(x)
            return embed_through(upstream[-1].block, x)
        for component, w in zip(upstream[:-1], weights):
            x = functional_forward(component, w, x)
        return functional_forward(self._upstream_embedding, weights[-1], x)

    @functools.cached_property
    def _upstream_embedding(self) -> EmbeddingOf:
        # One wrapper for the fit, so functional_forward's cached parameter slots serve every
        # step. A cached_property sits in __dict__, not _modules: no second copy in state_dict.
        return EmbeddingOf(self.components[-1].block)

    def classify(self, i: int, embedding: torch.Tensor) -> torch.Tensor:
        if i == UPSTREAM:
            return final_linear(self.components[-1].block)(embedding)
        return super().classify(i, embedding)

    def imitate(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        return None if i == UPSTREAM else super().imitate(i, x)

    def embedding_width(self, j: int) -> int:
        if j == UPSTREAM:
            return final_linear(self.components[-1].block).in_features
        return super().embedding_width(j)

    def standalone_model(self, i: int) -> nn.Module:
        return nn.Sequential(*self.components[1:]) if i == UPSTREAM else super().standalone_model(i)


def load_upstream(components: nn.ModuleList, ckpt_path: str) -> None:
    """Copy a sync run's component weights (K-1 components) into components 1..K-1."""
    try:
        state = load_checkpoint(ckpt_path)["state_dict"]
    except CheckpointError as err:  # no --trust-checkpoint here: a sync run's weights never need it
        raise ConfigError(
            f"mach.upstream_ckpt={ckpt_path}: {err.reason}; give the last.ckpt of a sync run."
        ) from None
    prefix = "components."
    renamed = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            renamed[f"{int(index) + 1}.{rest}"] = value
    wanted = {k for k in components.state_dict() if not k.startswith("0.")}
    if set(renamed) != wanted:
        raise ConfigError(
            f"mach.upstream_ckpt={ckpt_path} does not hold a sync model with "
            f"{len(components) - 1} components of this backbone."
        )
    components.load_state_dict({**components.state_dict(), **renamed})
