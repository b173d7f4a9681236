"""Synchronous backprop: the baseline every decoupled topology is compared against."""

from __future__ import annotations

import torch.nn.functional as F

from mach_lightning.methods import register_topology
from mach_lightning.sim.module import TopologyModule


@register_topology
class Sync(TopologyModule):
    """End-to-end backprop through all K components; one optimizer step per component per batch."""

    name = "sync"

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.component_optimizers()
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        return {"loss": loss.detach(), "logits": logits.detach()}
