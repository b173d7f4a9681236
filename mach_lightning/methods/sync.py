"""Synchronous backprop: the baseline every decoupled method is compared against.

Every link is live: each node's output reaches the next as part of one autograd graph, and the
last node's loss trains every component in the same step (one optimizer step each).
"""

from __future__ import annotations

import torch.nn.functional as F

from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.rule import ChainRule
from mach_lightning.methods import register_topology


@register_topology
class Sync(ChainRule):
    """End-to-end backprop through all K components."""

    name = "sync"
    free = True  # free mode: waits for everything (cross-process backprop)
    diagnostics = False
    parallel = False  # simulated time: one backprop chain

    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        out = Outbox(node.index, applied=[inbox.batch])
        h = node.component(inbox.x if node.index == 0 else inbox.one("activation"))
        if self.is_last(node):
            out.logits = h
            if inbox.y is not None:
                out.logits_loss = F.cross_entropy(h, inbox.y)
                out.add_loss(out.logits_loss)
        else:
            out.send(node.index + 1, h, inbox.batch)
        return out
