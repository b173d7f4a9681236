"""Decoupled Greedy Learning (Belilovsky et al., 2019, 2020): local losses, no gradient between.

Each component but the last gets a small auxiliary classifier (topology.aux_head: linear, or mlp
with topology.aux_hidden units; convolutional features are pooled to 2x2 first) and trains on its
own cross-entropy; the last component trains on the real loss. Inputs are detached, so no gradient
crosses a component boundary. Every local loss is summed and backpropagated once per step.

Two ways staleness enters (sim/staleness.py):
  async_buffer = 0  the schedule's d_i is the age of the activations component i trains on: batch
                    s's input to component i (produced by component i-1 when s went forward) is
                    queued and trained on at step s + d_i with the current weights. All 0: DGL.
  async_buffer = M  DGL's asynchronous variant: component i > 0 samples one stored activation from
                    a replay buffer of the last M written by component i-1 (at earlier steps) and
                    writes its own output to the next buffer. The schedule's `active` view slows
                    components down (straggler: the slow one works 1 step in straggler_factor), so
                    the components above it train on staler activations. Component 0 reads data.
train/loss and train/acc are the full model's on the current batch (a forward without gradient in
async mode), comparable with sync. Memory in flight: per component, d_i (or M) stored inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.config import register_choices
from mach_lightning.core.blocks import Component
from mach_lightning.core.inflight import DelayQueue, ReplayBuffer, frozen_buffers
from mach_lightning.methods import register_topology
from mach_lightning.nets import build_backbone
from mach_lightning.sim.diagnostics import StaleDiagnosticsMixin
from mach_lightning.sim.module import MAIN_HEAD, TopologyModule
from mach_lightning.sim.simtime import SimLayout
from mach_lightning.sim.staleness import create_schedule, step_generator

AUX_HEADS = ["linear", "mlp"]
register_choices("topology.aux_head", lambda: AUX_HEADS)


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


@register_topology
class Local(StaleDiagnosticsMixin, TopologyModule):
    """DGL: per-component auxiliary losses; optional asynchronous replay buffers."""

    name = "local"

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        k = cfg.model.num_components
        self.schedule = create_schedule(cfg.staleness, k, cfg.seed)
        self.queue = DelayQueue()
        size = cfg.topology.async_buffer
        self.buffers = [ReplayBuffer(size) for _ in range(k)] if size > 0 else []
        self._layout: SimLayout | None = None
        self.init_diagnostics()

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
                t = self.cfg.topology
                head = aux_head(tuple(h.shape[1:]), self.num_classes, t.aux_head, t.aux_hidden)
            components.append(Component(block, i, head))
        return nn.ModuleList(components)

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {}
        for i, component in enumerate(self.components):
            x = component(x)
            if component.head is not None:
                logits[f"c{i}"] = component.head(x)
        return {MAIN_HEAD: x, **logits}

    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD] + [f"c{i}" for i in range(self.cfg.model.num_components - 1)]

    def sim_layout(self) -> SimLayout:
        if self._layout is None:
            self._layout = SimLayout(parallel=True, messages_per_link=1)
            if self.buffers:  # each component works a fraction of the steps (1/factor if slowed)
                active = [self.schedule.active(t) for t in range(1000)]
                self._layout.rates = [sum(col) / len(active) for col in zip(*active)]
            elif self.schedule.max_delay() > 0:  # a delayed component forwards twice
                self._layout.extra_forwards = 1.0
        return self._layout

    def inflight_bytes(self) -> int:
        return self.queue.held_bytes() + sum(b.held_bytes() for b in self.buffers)

    # ----- the step -----
    def local_loss(self, index: int, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = self.components[index].head
        return F.cross_entropy(out if head is None else head(out), y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.batch_step
        if self.buffers:
            losses, applied = self._replay_losses(x, y, step)
            with torch.no_grad(), frozen_buffers(self.components):
                logits = self(x)
        else:
            losses, applied, logits = self._queued_losses(x, y, step)
        for i, component in enumerate(self.components):
            if i not in applied:  # nothing to train on this step: zero, but DDP sees it
                losses.extend(0.0 * p.sum() for p in component.parameters())
        measured = None
        if self.probe.is_due(step):  # the weights are still those of step t
            measured = self.probe.measure(step, self.components, x, y, applied)
        optimizers = self.component_optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(torch.stack(losses).sum())
        for i in sorted(applied):
            optimizers[i].step()
        if measured is not None:
            self.probe_metrics = self.probe.compare(measured, self.components, applied)
        self.probe.forget(step)
        logits = logits.detach()
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def _queued_losses(self, x, y, step: int):
        """Fresh batch forward; delayed components queue their input and train on an old one."""
        losses, applied, h = [], {}, x
        delays = self.schedule.delays(step)
        self.probe.keep(step, x, y, [step + d for d in delays])
        for i, (component, delay) in enumerate(zip(self.components, delays)):
            inp = h.detach()
            if delay == 0:
                h = component(inp)
                losses.append(self.local_loss(i, h, y))
                applied.setdefault(i, []).append(step)
                self.staleness.record(i, 0)
            else:
                with torch.no_grad():
                    h = component(inp)
                self.queue.push((step, i), step + delay, {"input": inp, "target": y})
        for (batch, i), item in self.queue.due(step):
            with frozen_buffers(self.components[i]):  # its forward was counted when it was fresh
                out = self.components[i](item["input"])
            losses.append(self.local_loss(i, out, item["target"]))
            applied.setdefault(i, []).append(batch)
            self.staleness.record(i, step - batch)
            self.queue.pop((batch, i))
        return losses, applied, h

    def _replay_losses(self, x, y, step: int):
        """Active components train on a sample of the buffer below; outputs go to the next one.

        `applied` maps component -> the data batches it trained on, where known (component 0).
        """
        losses, applied, writes = [], {}, []
        for i, (component, active) in enumerate(zip(self.components, self.schedule.active(step))):
            if not active or (i > 0 and not len(self.buffers[i])):
                continue
            if i == 0:
                inp, target, written = x, y, step
            else:
                entry = self.buffers[i].sample(step_generator(self.schedule.seed, step, salt=i))
                inp, target, written = entry["input"], entry["target"], int(entry["step"])
            out = component(inp)
            losses.append(self.local_loss(i, out, target))
            applied[i] = [step] if i == 0 else []
            self.staleness.record(i, step - written)
            if i + 1 < len(self.components):
                writes.append((i + 1, {"input": out.detach(), "target": target, "step": step}))
        for i, entry in writes:  # written after every component read: a hop takes one step
            self.buffers[i].append(entry)
        return losses, applied

    # ----- checkpoints -----
    def topology_state_dict(self) -> dict[str, Any]:
        return {
            **super().topology_state_dict(),
            "queue": self.queue.state_dict(),
            "buffers": [b.state_dict() for b in self.buffers],
        }

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        super().load_topology_state_dict(state)
        self.queue.load_state_dict(state.get("queue", []))
        for buffer, saved in zip(self.buffers, state.get("buffers", [])):
            buffer.load_state_dict(saved)
