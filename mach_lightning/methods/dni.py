"""Decoupled Neural Interfaces: synthetic gradients break the backward lock (Jaderberg et al. 2016).

`dni`: after every component but the last sits a synthesizer S_i (mach_lightning/core/synth.py) that
predicts the gradient at the component's output h_i. Component i updates at once with S_i(h_i)
instead of waiting for the true gradient. `cdni` is the same rule with label-conditioned
synthesizers, S_i(h_i, y) (`conditioned = True`): a separate registered name, so configs and result
tables say which.

Node i owns component i and synthesizer i, with one optimizer each (indices i and K + i; the
synthesizers use synth.optimizer at synth.lr). The synthesizer learns by regression onto the *true
gradient at its boundary*: the successor's own (synthetic or, for the last component, loss)
gradient pushed back through the successor. That target is detached from the predictor, so
training a synthesizer never changes the base model.

A boundary whose true gradient is due at once (delay 0, as staleness.schedule gives boundary i
component i's delay) is live, through `SyntheticBoundary`, the identity on the forward pass; on
the backward pass it receives the true gradient arriving from the successor, records it (the
regression target), hands the component the synthetic gradient instead (or the true one during
`synth.warmup_steps`) and injects the regression gradient into the synthesizer. A boundary with
delay d_i > 0 is decoupled: the component applies the synthetic gradient at once, h_i goes over a
delayed link (a leaf at the successor), the true gradient reaching that leaf comes back as a
GRADIENT message d_i steps later (in free mode: when it arrives), and the synthesizer regresses
on it then, from the activation and labels the rule kept for that batch (`awaiting`,
checkpointed). So no node ever waits for a true gradient it does not need now, in any runtime.
During warm-up a late boundary stays live, and its target goes as a TARGET message from node i
to itself, due d_i steps later.
`runtime.synthesizer=oracle`: synthesizer b is node K + b (in dist, a process, as the reference's
gradient oracle was), between components b and b + 1: h_b reaches it live, and it runs boundary b
there (`boundary_step`). Every gradient is the same as with the synthesizer inside component b.
Per-boundary metrics:
  synth/loss_b{i}  regression loss at boundary i;  synth/cos_b{i}  cosine between the synthetic and
  the true gradient of the same batch;  diag/staleness_c{i}  the age of synthesizer i's targets.
`synth.scale` multiplies the synthetic gradient a component applies to its weights (applied to the
component's .grad after the backward), not the estimate passed down to the synthesizer below.
The precision must not use loss scaling (16-mixed): gradients are read as values at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mach_lightning.config import ConfigError, config_section, register_choices
from mach_lightning.core.memory import tensor_bytes
from mach_lightning.core.messages import ACTIVATION, GRADIENT, TARGET, Message
from mach_lightning.core.node import Inbox, Node, Outbox, Return
from mach_lightning.core.rule import ChainRule
from mach_lightning.core.synth import (
    GradientSynthesizer,
    boundary_shapes,
    synthesizer_loss,
    synthesizer_loss_grad,
)
from mach_lightning.methods import register_topology

register_choices("synth.optimizer", lambda: ["adam", "adamw", "sgd"])


@config_section("synth")
@dataclass
class SynthConfig:
    """Gradient synthesizers of dni/cdni (mach_lightning/core/synth.py)."""

    hidden: int = 1024  # hidden width of each synthesizer (MLP units or conv channels)
    layers: int = 1  # hidden layers of each synthesizer; 0: a linear map
    optimizer: str = "adam"  # the synthesizers' own optimizer: adam | adamw | sgd
    lr: float = 1e-4  # synthesizers' learning rate
    warmup_steps: int = 0  # batch steps of true (backprop) gradients before synthetic ones
    scale: float = 1.0  # multiplies the synthetic gradient a component applies to its weights


@dataclass
class Boundary:
    """What one boundary did on one step; `target` is filled in by the backward pass."""

    index: int
    activation: torch.Tensor  # h_i, detached
    prediction: torch.Tensor  # S_i(h_i): the synthetic per-example gradient
    use_true_gradient: bool  # warm-up: hand the component the true gradient
    regress_now: bool  # delay 0: the synthesizer regresses inside this backward pass
    target: torch.Tensor | None = field(default=None)  # B * true dL/dh_i


class SyntheticBoundary(torch.autograd.Function):
    """Identity forward; backward swaps the true gradient for the synthetic one (see module doc)."""

    @staticmethod
    def forward(ctx, h, prediction, boundary: Boundary):
        ctx.save_for_backward(prediction)
        ctx.boundary = boundary
        return h.view_as(h)

    @staticmethod
    def backward(ctx, true_grad):
        (prediction,) = ctx.saved_tensors
        boundary, batch = ctx.boundary, true_grad.shape[0]
        target = per_example(true_grad.detach())  # what the synthesizer predicts
        boundary.target = target
        to_component = true_grad if boundary.use_true_gradient else prediction.detach() / batch
        to_synthesizer = None
        if boundary.regress_now and ctx.needs_input_grad[1]:
            to_synthesizer = synthesizer_loss_grad(prediction, target)
        return to_component, to_synthesizer, None


@register_topology(section=SynthConfig)
class DNI(ChainRule):
    """Synthetic gradients at every boundary; unconditioned synthesizers."""

    name = "dni"
    conditioned = False  # cdni: synthesizers see the labels too
    free = True  # free mode: steps on the synthetic gradient, regresses when the true one comes

    def free_delays(self) -> list[int]:
        """Free mode: every boundary decoupled (a true gradient is applied when it comes)."""
        return [1] * (self.num_components - 1) + [0]

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        if str(cfg.trainer.precision).startswith("16"):
            raise ConfigError(
                f"{self.name} reads gradients as values at each boundary, which "
                "loss scaling distorts; use trainer.precision=32-true or bf16-mixed."
            )
        super().__init__(cfg, input_shape, num_classes)
        self.warmup_steps, self.scale = int(cfg.synth.warmup_steps), float(cfg.synth.scale)
        # runtime.synthesizer=oracle: each synthesizer is a node (a process) of its own
        self.oracle = cfg.runtime.get("synthesizer", "component") == "oracle"
        # (node, batch) -> a decoupled boundary's activation, labels and synthetic gradient,
        # until the true gradient of that batch comes back
        self.awaiting: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def build_components(self) -> nn.ModuleList:
        components = super().build_components()
        synth, classes = self.cfg.synth, self.num_classes if self.conditioned else 0
        # Built after the components, so a seed gives the components sync's initial weights.
        self.synthesizers = nn.ModuleList(
            GradientSynthesizer(shape, synth.hidden, synth.layers, classes)
            for shape in boundary_shapes(components, self.input_shape)
        )
        return components

    def modules(self) -> dict[str, nn.Module]:
        return {"components": self.components, "synthesizers": self.synthesizers}

    def make_node(self, i: int) -> Node:
        if i == len(self.synthesizers) or self.oracle:  # no synthesizer in this node
            return Node(i, {"component": self.components[i]}, optimizers=[i])
        modules = {"component": self.components[i], "synthesizer": self.synthesizers[i]}
        return Node(i, modules, optimizers=[i, len(self.components) + i])

    def nodes(self) -> list[Node]:
        """runtime.synthesizer=oracle: synthesizer b is node K + b, stepping between components b
        and b + 1 (the chain c0, s0, c1, s1, ...), so a runtime with one process per node gives
        each synthesizer a process of its own."""
        if not hasattr(self, "_nodes"):  # built once: nodes hold per-node state
            k, self._nodes = len(self.components), []
            for i in range(k):
                self._nodes.append(self.make_node(i))
                if self.oracle and i < len(self.synthesizers):
                    modules = {"synthesizer": self.synthesizers[i]}
                    self._nodes.append(Node(k + i, modules, optimizers=[k + i]))
        return self._nodes

    def component_of(self, index: int) -> int:
        """Synthesizer b's node counts under component b (diag/staleness_c{b}: its targets' age)."""
        return index if index < len(self.components) else index - len(self.components)

    def optimizer_groups(self):
        # Components use optim.*; synthesizers their own optimizer at synth.lr: a regression
        # whose targets shrink as training goes on is best left to an adaptive optimizer.
        synth = self.cfg.synth
        synth_optim = OmegaConf.merge(self.cfg.optim, {"name": synth.optimizer, "lr": synth.lr})
        groups = [(list(s.parameters()), synth_optim) for s in self.synthesizers]
        return super().optimizer_groups() + groups

    def synthetic_gradient(self, index: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Synthesizer `index`'s per-example gradient for h (tests swap in an oracle here)."""
        return self.synthesizers[index](h, y)

    # ----- one step of one node -----
    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        """Component i updates with batch t now; its synthesizer regresses on the true gradients
        that arrive: batch t's inside this backward (delay 0), earlier batches' as messages."""
        i, t, k = node.index, inbox.batch, len(self.components)
        if i >= k:  # runtime.synthesizer=oracle: synthesizer i - k's own node
            out = Outbox(i, stepped=True, ages=[])
            self.boundary_step(node, out, inbox.one(ACTIVATION, t), inbox, i - k)
            return out
        out = Outbox(i, applied=[t], ages=[])  # ages: of the targets the synthesizer learns from
        h = node.component(inbox.x if i == 0 else inbox.one(ACTIVATION, t))
        if self.is_last(node):
            out.logits, out.logits_loss = h, F.cross_entropy(h, inbox.y)
            out.add_loss(out.logits_loss)
            return out
        if self.oracle:  # h goes live to the synthesizer's node; its gradient is the synthetic one
            out.send(k + i, h, t)
        else:
            self.boundary_step(node, out, h, inbox, i)
        if self.scale != 1.0 and inbox.step >= self.warmup_steps:
            out.after_backward.append(lambda: self.scale_update(node))
        return out

    def boundary_step(self, node: Node, out: Outbox, h, inbox: Inbox, b: int) -> None:
        """Boundary b on batch t: the synthetic gradient for h (live or decoupled), and the
        synthesizer's regression on whatever true gradients have come back."""
        t, delay = inbox.batch, inbox.delays[b]
        prediction = self.synthetic_gradient(b, h.detach(), inbox.y)
        warmup = inbox.step < self.warmup_steps
        boundary = Boundary(b, h.detach(), prediction.detach(), warmup, regress_now=delay == 0)
        if delay == 0 or warmup:  # the true gradient is needed inside this backward
            self.live_boundary(out, h, prediction, boundary, inbox, delay)
        else:
            self.decoupled_boundary(out, h, boundary, inbox, delay)
        for message in inbox.take(TARGET):  # live boundaries' targets of earlier batches
            self.learn(b, node, out, message, message.context, t)
        for message in inbox.take(GRADIENT):  # decoupled boundaries' true gradients
            kept = self.awaiting.pop((b, message.batch))
            self.learn(b, node, out, message, kept, t)
            self.record_cosine(node, b, kept["prediction"], per_example(message.tensor))
        if not out.ages:  # nothing to learn from: zero, but plain DDP sees every parameter used
            out.add_loss(sum(0.0 * p.sum() for p in node.modules["synthesizer"].parameters()))
        out.after_backward.append(lambda: self.boundary_metrics(node, boundary))

    def live_boundary(self, out, h, prediction, boundary: Boundary, inbox, delay: int) -> None:
        """h goes on through SyntheticBoundary, live: the successor's backward reaches it in this
        step's backward, and the true gradient there is recorded (and, if late, sent on to this
        node as a TARGET due `delay` steps later)."""
        i, t = boundary.index, inbox.batch
        link = SyntheticBoundary.apply(h, prediction, boundary)
        out.send(i + 1, link, t)
        if delay == 0:
            out.ages.append(0)
        else:  # the true gradient reaching the link: this node's target, due `delay` steps later
            link.retain_grad()
            context = {"activation": boundary.activation, "labels": inbox.y}
            out.returns.append(Return(link, out.sender, out.sender, t, delay, TARGET, context))

    def decoupled_boundary(self, out, h, boundary: Boundary, inbox, delay: int) -> None:
        """A late true gradient need not flow through this step's backward: the component
        applies the synthetic gradient at once, h goes over a delayed link (a leaf at the
        successor, whose gradient comes back as a GRADIENT message), and the synthesizer's
        inputs wait here for it. Nobody waits on anybody: how free mode runs dni/cdni."""
        i, t = boundary.index, inbox.batch
        batch = h.shape[0]
        out.add_loss((h * (boundary.prediction / batch)).sum())  # d/dh: the synthetic gradient
        out.send(i + 1, h, t, delay=delay)
        self.awaiting[(i, t)] = {
            "activation": boundary.activation, "labels": inbox.y,
            "prediction": boundary.prediction,
        }  # fmt: skip

    def learn(self, i: int, node: Node, out: Outbox, message: Message, inputs: dict, t: int):
        """Synthesizer i regresses on a late true gradient (dL/dh as the backward left it)."""
        prediction = self.synthetic_gradient(i, inputs["activation"], inputs["labels"])
        regression = synthesizer_loss(prediction, per_example(message.tensor))
        node.meter.add(f"synth/loss_b{i}", regression)
        out.add_loss(regression)
        out.ages.append(t - message.batch)

    # ----- what waits for its gradient (decoupled boundaries): checkpointed, counted -----
    def state_dict(self) -> dict:
        return {"awaiting": dict(self.awaiting)}

    def load_state_dict(self, state: dict) -> None:
        self.awaiting = dict(state.get("awaiting", {}))

    def held_bytes(self) -> int:
        return tensor_bytes(self.awaiting)  # each storage once: boundaries share the labels

    def boundary_metrics(self, node: Node, b: Boundary) -> None:
        """After the backward: the regression loss and cosine of a live boundary's batch."""
        if b.regress_now:
            node.meter.add(f"synth/loss_b{b.index}", synthesizer_loss(b.prediction, b.target))
        if b.target is not None:  # a live boundary's: recorded by this backward
            self.record_cosine(node, b.index, b.prediction, b.target)

    def scale_update(self, node: Node) -> None:
        """synth.scale: the synthetic update component i applies to its weights, scaled."""
        for p in node.component.parameters():
            if p.grad is not None:
                p.grad.mul_(self.scale)

    def record_cosine(self, node: Node, b: int, prediction, target: torch.Tensor) -> None:
        """synth/cos_b{b}: the synthetic gradient against the true one, of the same batch."""
        cos = F.cosine_similarity(prediction.flatten(), target.flatten(), dim=0, eps=1e-30)
        node.meter.add(f"synth/cos_b{b}", cos)


def per_example(gradient: torch.Tensor) -> torch.Tensor:
    """The per-example target a synthesizer predicts: B times dL/dh (as in SyntheticBoundary)."""
    return gradient * gradient.shape[0]


@register_topology(section=SynthConfig)
class CDNI(DNI):
    """cDNI: DNI with synthesizers conditioned on the labels (one-hot), S_i(h_i, y)."""

    name = "cdni"
    conditioned = True
