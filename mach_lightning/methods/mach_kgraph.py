"""MACH, complete graph: each of K components consumes the concatenation of all others' embeddings.

Component i's teacher sees x and [e_j for j != i] (in index order), or the imitation of that
concatenation by its one student. The graph has cycles, so what a component publishes to the
others is its *standalone* embedding f_j(x, s_j(x)) (student-wired, computed first, no waiting:
nodes 0..K-1 publish, nodes K..2K-1 train the teachers on it; methods/mach_base.py); with
use_student=neighbour a teacher is then trained on the others' published embeddings, and its
gradient reaches them (teacher and student) delayed by their d_j. Evaluation as in mach_seq.
"""

from __future__ import annotations

from torch import nn

from mach_lightning.core.mach_blocks import build_mach_component, teacher_embedding_dim
from mach_lightning.methods import register_topology
from mach_lightning.methods.mach_base import Edges, MachConfig, MachRule


@register_topology(section=MachConfig)
class MachKGraph(MachRule):
    """f_i(x, [e_j]_{j != i}); students s_i(x) ~ [e_j]_{j != i}."""

    name = "mach_kgraph"

    def build_components(self) -> nn.ModuleList:
        k = self.num_components
        dim = teacher_embedding_dim(self.cfg, self.input_shape, self.num_classes)
        return nn.ModuleList(
            build_mach_component(self.cfg, self.input_shape, self.num_classes, i, (k - 1) * dim)
            for i in range(k)
        )

    def edges(self) -> Edges:
        k = self.num_components
        neighbours = tuple(tuple(j for j in range(k) if j != i) for i in range(k))
        return Edges(neighbours, order=tuple(range(k)), standalone=True)
