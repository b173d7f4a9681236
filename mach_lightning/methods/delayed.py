"""Decoupled Parallel Backprop (Huo et al., 2018): each component's backward is d_i steps late.

Every step, batch t goes forward through all components at the current weights. Component i applies
the gradient of batch t - d_i, where d_i comes from the staleness schedule (pipeline: d_i = K-1-i).
The gradient reaching component i for batch s is the one its successor computed from batch s, so a
component can never be less late than its successor: the applied delays are the running maximum of
the schedule's from the top (e.g. a straggler delays everything below it). Consecutive components
with equal delay share one autograd graph (their link has gradient delay 0, as in sync backprop);
between them the gradient travels as a GRADIENT message, due when the receiver applies batch s.
Delays are drawn per batch when it goes forward, so random schedules work too: each batch's
gradient is applied exactly once per component, at s + d_i(s); gradients due together are summed.

delayed.grad_mode (core/stored.py defines both once):
  stash      the gradient at the weights that did batch s's forward (PipeDream's weight stashing).
             For any delays this equals the full backprop gradient of batch s at the weights of
             step s, restricted to component i.
  recompute  the forward of batch s is redone from its stored input with the current weights and
             the successor's gradient message is backpropagated through it (Features Replay).
DC-ASGD (delayed.dcasgd_lambda > 0) wraps each component's optimizer; its w_then is the stashed
weights (with recompute the gradient is already at the current weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mach_lightning.config import config_section, register_choices
from mach_lightning.core.dcasgd import DCASGD
from mach_lightning.core.messages import ACTIVATION, GRADIENT
from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.rule import ChainRule
from mach_lightning.core.stored import GRAD_MODES
from mach_lightning.core.weights import functional_forward
from mach_lightning.methods import register_topology

register_choices("delayed.grad_mode", lambda: list(GRAD_MODES))


@config_section("delayed")
@dataclass
class DelayedConfig:
    """cfg.delayed: how the late gradients are computed and applied."""

    grad_mode: str = "stash"  # stash (forward-time weights) | recompute (current ones)
    dcasgd_lambda: float = 0.0  # DC-ASGD delay compensation strength; 0 = plain optimizer
    dcasgd_lr_scaling: bool = False  # divide the lr by the applied staleness (SA-ASGD)


def causal_delays(delays: list[int]) -> list[int]:
    """Running maximum from the top: no component hears of batch s before its successor did."""
    out, running = [], 0
    for d in reversed(delays):
        running = max(running, int(d))
        out.append(running)
    return out[::-1]


@register_topology(section=DelayedConfig)
class Delayed(ChainRule):
    """Delayed-gradient backprop with per-component staleness; grad_mode stash or recompute."""

    name = "delayed"
    free = True  # free mode: applies whatever gradient has arrived

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        self.grad_mode = cfg.delayed.grad_mode
        super().__init__(cfg, input_shape, num_classes)
        self.extra_forwards = 1.0 if self.grad_mode == "recompute" else 0.0
        t = cfg.delayed
        self.compensated = t.dcasgd_lambda > 0 or t.dcasgd_lr_scaling
        self._causal: tuple[tuple, list[int]] = ((), [])

    def free_delays(self) -> list[int]:
        """Free mode: every link decoupled (a pipeline's delays); the real ones are measured."""
        return [self.num_components - 1 - i for i in range(self.num_components)]

    def causal(self, delays: list[int]) -> list[int]:
        """causal_delays, once per step (every node of the step asks for the same)."""
        if self._causal[0] != tuple(delays):
            self._causal = (tuple(delays), causal_delays(delays))
        return self._causal[1]

    def wrap_optimizer(self, optimizer, index: int):
        t = self.cfg.delayed
        return (
            DCASGD(optimizer, t.dcasgd_lambda, t.dcasgd_lr_scaling)
            if self.compensated
            else optimizer
        )

    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        """Batch t forward (kept if its gradient is late); every late gradient due now applied."""
        i, t, out = node.index, inbox.batch, Outbox(node.index)
        d = self.causal(inbox.delays)
        h = self.forward(node, t, inbox.x if i == 0 else inbox.one(ACTIVATION, t), d, inbox.y)
        if self.is_last(node):
            out.logits = h
        else:
            out.send(i + 1, h, t, delay=d[i] - d[i + 1])
        if d[i] == 0:
            if self.is_last(node):
                out.logits_loss = F.cross_entropy(h, inbox.y)
                out.add_loss(out.logits_loss)
            out.applied.append(t)
        for s in node.stored.due(t):  # the batches whose gradient is due: replay their forward
            meta, fn = node.stored.meta(s), self.run(node)
            h_s, (leaf,) = node.stored.replay(s, fn, [i > 0], [inbox.one(ACTIVATION, s)])
            g = inbox.one(GRADIENT, s)
            if self.is_last(node):
                out.add_loss(F.cross_entropy(h_s, meta["y"]))
            elif g is not None:  # the top of a run of equal delays: the message from above
                out.add_loss((h_s * g).sum())
            else:  # the node above applies s now too: one graph through both
                out.send(i + 1, h_s, s, delay=0)
            if i > 0:
                out.give_back(leaf, i - 1, s, delay=meta["delays"][i - 1] - meta["delays"][i])
            out.applied.append(s)
        if self.compensated:
            out.before_step.append(self.compensation(node, out.applied, t))
        for s in out.applied:
            node.stored.forget(s)
        return out

    def forward(self, node: Node, t: int, h: torch.Tensor, d: list[int], y) -> torch.Tensor:
        if d[node.index] == 0:
            return node.component(h)
        i, due = node.index, t + d[node.index]
        live_input = i > 0 and d[i - 1] == d[i]  # the node below replays s with this one
        h = node.stored.forward(
            t,
            self.run(node),
            (h,),
            due,
            keep_inputs=[not live_input],
            delays=d,
            y=y if self.is_last(node) else None,
        )
        # recompute ran without a graph, but the gradient reaching this output must still come
        # back to be replayed: the output asks for one, as a leaf.
        return h if h.requires_grad else h.requires_grad_()

    @staticmethod
    def run(node: Node):
        component = node.component
        return lambda w, h: component(h) if w is None else functional_forward(component, w[0], h)

    def compensation(self, node: Node, applied: list[int], step: int):
        """DC-ASGD's w_then (the stashed weights; their mean if several batches are due)."""
        copies = [node.stored.weights(s) if s in node.stored.records else None for s in applied]

        def hook(optimizers: list) -> None:
            inner = getattr(optimizers[0], "optimizer", optimizers[0])  # wrapped by Lightning
            if not isinstance(inner, DCASGD) or not applied:
                return
            names = [n for n, _ in node.component.named_parameters()]
            staleness = sum(step - s for s in applied) / len(applied)
            if self.grad_mode != "stash" or any(c is None for c in copies):
                inner.set_stale_weights([None] * len(names), staleness)
                return
            w_then = [torch.stack([c[0][n] for c in copies]).mean(0) for n in names]
            inner.set_stale_weights(w_then, staleness)

        return hook
