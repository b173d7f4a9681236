"""Decoupled Greedy Learning (Belilovsky et al., 2019, 2020): local losses, no gradient between.

Each component but the last gets a small auxiliary classifier (local.aux_head: linear, or mlp
with local.aux_hidden units; convolutional features are pooled to 2x2 first) and trains on its
own cross-entropy; the last component trains on the real loss. A node's input is detached, so no
gradient crosses a component boundary: a local node never sends a GRADIENT. Every local loss is
summed and backpropagated once per step.

Two ways staleness enters (sim/staleness.py):
  async_buffer = 0  the schedule's d_i is the age of the activations component i trains on: batch
                    s's input to node i (produced by node i-1 when s went forward) is kept by the
                    node (a stored forward, core/stored.py, recompute: the input alone) and
                    trained on at step s + d_i with the current weights, BatchNorm statistics
                    frozen (they counted the batch at its forward). All 0: DGL.
  async_buffer = M  DGL's asynchronous variant: node i > 0 samples one stored activation from
                    its replay buffer of the last M that node i-1 wrote (at earlier steps), and
                    writes its own output to node i+1's. The schedule's activity (`inbox.active`)
                    slows components down (straggler: the slow one works 1 step in
                    straggler_factor), so the nodes above it train on staler activations. Node 0
                    reads data.
train/loss and train/acc are the full model's on the current batch (a forward without gradient in
async mode), comparable with sync. Memory in flight: per component, d_i (or M) stored inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.config import config_section, register_choices
from mach_lightning.core.blocks import Component
from mach_lightning.core.messages import ACTIVATION
from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.random import step_generator
from mach_lightning.core.replay import ReplayBuffer
from mach_lightning.core.rule import MAIN_HEAD, ChainRule
from mach_lightning.core.weights import frozen_buffers
from mach_lightning.methods import register_topology
from mach_lightning.nets import build_backbone

AUX_HEADS = ["linear", "mlp"]
register_choices("local.aux_head", lambda: AUX_HEADS)


@config_section("local")
@dataclass
class LocalConfig:
    """cfg.local: the auxiliary classifiers and the asynchronous replay buffers."""

    aux_head: str = "linear"  # auxiliary classifier per component: linear | mlp
    aux_hidden: int = 256  # hidden width of aux_head=mlp
    async_buffer: int = 0  # replay buffer of M stale activations per component (0: off)


def aux_head(shape: tuple, num_classes: int, kind: str, hidden: int) -> nn.Module:
    """A small classifier on a component's output of this shape (without the batch dimension)."""
    layers: list[nn.Module] = []
    if len(shape) == 3:  # feature maps: pool to 2x2 so the head stays small at any resolution
        layers.append(nn.AdaptiveAvgPool2d(2))
        shape = (shape[0], 2, 2)
    layers.append(nn.Flatten())
    features = math.prod(shape)
    if kind == "mlp":
        layers += [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    else:
        layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@register_topology(section=LocalConfig)
class Local(ChainRule):
    """DGL: per-component auxiliary losses; optional asynchronous replay buffers."""

    name = "local"
    free = True  # free mode: never waits on a gradient (none crosses a link)
    messages_per_link = 1  # simulated time: only activations cross a link

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        self.buffer_size = int(cfg.local.async_buffer)
        self.grad_mode = None if self.buffer_size else "recompute"  # late inputs, kept alone
        super().__init__(cfg, input_shape, num_classes)
        # The replay samples draw with the staleness schedule's seed (sim/staleness.py's rule).
        self.seed = cfg.seed if cfg.staleness.seed is None else int(cfg.staleness.seed)

    def build_components(self) -> nn.ModuleList:
        blocks = build_backbone(self.cfg.model, self.input_shape, self.num_classes)
        h = torch.zeros(2, *self.input_shape)
        components = []
        for i, block in enumerate(blocks):
            with torch.no_grad():  # eval mode: find the output shape without touching statistics
                h = block.eval()(h)
            block.train()
            head = None
            if i < len(blocks) - 1:
                t = self.cfg.local
                head = aux_head(tuple(h.shape[1:]), self.num_classes, t.aux_head, t.aux_hidden)
            components.append(Component(block, i, head))
        return nn.ModuleList(components)

    def make_node(self, i: int) -> Node:
        node = super().make_node(i)
        if self.buffer_size and i > 0:  # node 0 reads the data
            node.state["buffer"] = ReplayBuffer(self.buffer_size)
        return node

    def extra_forwards_at(self, max_delay: int) -> float:
        """A delayed component forwards twice: fresh (for the chain) and on its stale input."""
        return 1.0 if max_delay > 0 and not self.buffer_size else 0.0

    def rates(self, active) -> list[float] | None:
        """Async mode: each component works a fraction of the steps (1/factor if slowed)."""
        if not self.buffer_size:
            return None
        steps = [active(t) for t in range(1000)]
        return [sum(col) / len(steps) for col in zip(*steps)]

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {}
        for i, component in enumerate(self.components):
            x = component(x)
            if component.head is not None:
                logits[f"c{i}"] = component.head(x)
        return {MAIN_HEAD: x, **logits}

    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD] + [f"c{i}" for i in range(len(self.components) - 1)]

    # ----- one step of one node -----
    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        return self.replay_step(node, inbox) if self.buffer_size else self.queued_step(node, inbox)

    def queued_step(self, node: Node, inbox: Inbox) -> Outbox:
        """Batch t forward: trained on now if on time, else its input kept for d_i steps; every
        kept input due now trained on with the current weights."""
        i, t, out = node.index, inbox.batch, Outbox(node.index)
        h = (inbox.x if i == 0 else inbox.one(ACTIVATION, t)).detach()  # no gradient crosses
        delay = inbox.delays[i]
        if delay == 0:
            h = node.component(h)
            out.add_loss(self.local_loss(node, h, inbox.y))
            out.applied.append(t)
        else:  # kept until t + delay; now only its output, without a graph, for the successor
            h = node.stored.forward(t, self.run(node), (h,), t + delay, y=inbox.y)
        for s in node.stored.due(t):  # replayed with frozen statistics: counted at the forward
            h_s, _ = node.stored.replay(s, self.run(node), [False])
            out.add_loss(self.local_loss(node, h_s, node.stored.meta(s)["y"]))
            out.applied.append(s)
            node.stored.forget(s)
        self.pass_on(node, out, h, t)
        return out

    def replay_step(self, node: Node, inbox: Inbox) -> Outbox:
        """Async mode: an active node trains on a sample of its buffer (node 0: the batch), then
        keeps what node i-1 wrote this step for later steps (a hop takes one step)."""
        i, t = node.index, inbox.batch
        out, written = Outbox(i, stepped=False), {}
        # The full model on batch t, for train/loss. Before the training forward: restoring the
        # statistics after it would invalidate its graph (BatchNorm saves them), and train-mode
        # outputs do not depend on them, so the order changes no value.
        chain = inbox.x if i == 0 else inbox.one(ACTIVATION, t)
        with torch.no_grad(), frozen_buffers(node.component):
            chain = node.component(chain)
        sample = self.sample(node, inbox)
        if sample is not None:
            inp, target, step = sample
            h = node.component(inp)
            out.add_loss(self.local_loss(node, h, target))
            out.stepped, out.ages = True, [t - step]
            out.applied = [t] if i == 0 else []  # a sample's batch is not known
            written = {"output": h.detach(), "target": target}
        if i > 0:
            arrived = inbox.take(ACTIVATION, t)[0].context
            if arrived:
                entry = {"input": arrived["output"], "target": arrived["target"], "step": t}
                node.state["buffer"].append(entry)
        self.pass_on(node, out, chain, t, **written)
        return out

    def sample(self, node: Node, inbox: Inbox):
        """(input, labels, step written) to train on at this step, or None (idle or empty)."""
        i, t = node.index, inbox.batch
        if not inbox.active[i]:
            return None
        if i == 0:
            return inbox.x, inbox.y, t
        buffer = node.state["buffer"]
        if not len(buffer):
            return None
        entry = buffer.sample(step_generator(self.seed, t, salt=i))
        return entry["input"], entry["target"], int(entry["step"])

    def pass_on(self, node: Node, out: Outbox, h: torch.Tensor, t: int, **context) -> None:
        """The last node's output is the model's logits; the others send it on, detached."""
        if self.is_last(node):
            out.logits = h
        else:
            out.send(node.index + 1, h.detach(), t, **context)

    @staticmethod
    def local_loss(node: Node, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = node.component.head
        return F.cross_entropy(h if head is None else head(h), y)

    @staticmethod
    def run(node: Node):
        component = node.component
        return lambda weights, h: component(h)  # recompute: always the current weights

    # ----- replay buffers: in-flight state beyond the stored forwards -----
    def buffers(self) -> dict[int, ReplayBuffer]:
        return {n.index: n.state["buffer"] for n in self.nodes() if "buffer" in n.state}

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {i: b.state_dict() for i, b in self.buffers().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("buffers", {})
        for i, buffer in self.buffers().items():
            if i in saved:
                buffer.load_state_dict(saved[i])

    def held_bytes(self) -> int:
        return sum(b.held_bytes() for b in self.buffers().values())
