"""MACH, sequential: a chain of K components, each a teacher that consumes the next one's embedding.

Component i's teacher f_i sees x and the embedding of component i+1 (its *child*), or its
student's imitation of it (mach.use_student); the last component sees x alone. Every component
has its own target head and loss, and component i's student learns to reproduce component i+1's
embedding from x. The child's gradient from its parent is delayed by the child's d_{i+1}
(staleness.schedule); see methods/mach_base.py for the mechanics. At evaluation every component
uses its student, not its child (val/acc_c{i}), so each is usable alone; val/acc is component 0
as trained. The main job: configs/seq.yaml.
"""

from __future__ import annotations

from torch import nn

from mach_lightning.core.mach_blocks import build_mach_component, teacher_embedding_dim
from mach_lightning.methods import register_topology
from mach_lightning.methods.mach_base import Edges, MachConfig, MachRule


@register_topology(section=MachConfig)
class MachSeq(MachRule):
    """f_i(x, e_{i+1}) for i < K-1, f_{K-1}(x); students s_i(x) ~ e_{i+1}."""

    name = "mach_seq"

    def build_components(self) -> nn.ModuleList:
        k = self.num_components
        dim = teacher_embedding_dim(self.cfg, self.input_shape, self.num_classes)
        return nn.ModuleList(
            build_mach_component(
                self.cfg, self.input_shape, self.num_classes, i, dim if i < k - 1 else 0
            )
            for i in range(k)
        )

    def edges(self) -> Edges:
        k = self.num_components
        neighbours = tuple((i + 1,) if i + 1 < k else () for i in range(k))
        return Edges(neighbours, order=tuple(reversed(range(k))))  # the child first
