"""A node, what it receives on one step (its inbox) and what it produces (its outbox).

A *node* is one component with whatever trains with it (a local head, a student, a synthesizer)
and its own optimizer(s). A method's rule says what a node does with its inbox on one step: the
loss it adds and the messages it sends. Who runs the nodes (one process for all of them, or one
each) is the runtime's business, not the rule's: a rule never sees a global step, a process count
or Lightning. What a runtime tells a node about time is in its inbox: the batch it works on, its
own step count, and the link delays the runtime's schedule prescribes for that batch.

Forward messages (activations, embeddings) go over links. In the simulator a link whose gradient
delay is 0 stays a live autograd edge; a delayed one hands the receiver a leaf, and the gradient
that reaches the leaf goes back to the sender as a GRADIENT message, due `delay` steps later.
A node that must send on a gradient reaching a tensor of its own (a replayed forward's input)
lists it in `Outbox.returns`; the runtime reads it after the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.core.messages import ACTIVATION, GRADIENT, Message
from mach_lightning.core.meters import WindowMeans
from mach_lightning.core.stored import StoredForwards


@dataclass
class Node:
    """One component and what trains with it; its state lives here, not in the runtime."""

    index: int
    modules: dict[str, nn.Module]  # "component", and e.g. "synthesizer"
    optimizers: list[int]  # indices of its optimizers in the runtime's list
    stored: StoredForwards | None = None  # forwards kept for late gradients (grad_mode)
    state: dict[str, Any] = field(default_factory=dict)  # e.g. a replay buffer
    meter: WindowMeans = field(default_factory=WindowMeans)  # per-node metrics, logged windowed

    @property
    def component(self) -> nn.Module:
        return self.modules["component"]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]


@dataclass(slots=True)
class Inbox:
    """What a node has on one step: the batch, and every message that arrived for it."""

    batch: int  # the data batch of this step's fresh work
    x: torch.Tensor | None  # the input, for the nodes that read it
    y: torch.Tensor | None  # the labels (None: evaluation, no loss)
    step: int  # the node's own step count
    delays: list[int]  # the runtime's per-component delays for this batch
    messages: list[Message] = field(default_factory=list)
    active: list[bool] | None = None  # per component: works at this step (None: all of them)

    def __post_init__(self) -> None:
        if self.active is None:
            self.active = [True] * len(self.delays)

    def take(self, kind: str, batch: int | None = None) -> list[Message]:
        """The messages of a kind (and batch), in arrival order."""
        return [m for m in self.messages if m.kind == kind and (batch is None or m.batch == batch)]

    def one(self, kind: str, batch: int | None = None, sender: int | None = None):
        """The tensor of the one message of this kind, batch and sender; None if none came."""
        for m in self.take(kind, batch):
            if sender is None or m.sender == sender:
                return m.tensor
        return None


@dataclass
class Return:
    """A tensor whose gradient, after the backward, goes from `sender` to `receiver`."""

    tensor: torch.Tensor
    sender: int
    receiver: int
    batch: int
    delay: int
    kind: str = GRADIENT
    context: dict[str, torch.Tensor] = field(default_factory=dict)
    message: Message | None = None  # the forward message it answers (a delayed link's leaf)
    returned: bool = False  # set by the runtime when a gradient reached the tensor


@dataclass
class Outbox:
    """What a node produced on one step: its loss, its messages, and what it updated with."""

    sender: int
    loss: torch.Tensor | float = 0.0
    messages: list[Message] = field(default_factory=list)
    delays: list[int] = field(default_factory=list)  # per message: its link's gradient delay
    returns: list[Return] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)  # batches this step's update holds
    stepped: bool | None = None  # whether it updates (None: when it applied something)
    ages: list[int] | None = None  # staleness of what it applied (None: step - each batch)
    after_backward: list[Callable[[], None]] = field(default_factory=list)
    before_step: list[Callable[[list], None]] = field(default_factory=list)  # (its optimizers)
    logits: torch.Tensor | None = None
    logits_loss: torch.Tensor | None = None  # cross-entropy of `logits`, if the rule computed it

    @property
    def updates(self) -> bool:
        """Whether the node's optimizers step: it applied a batch, or says so (replays)."""
        return bool(self.applied) if self.stepped is None else self.stepped

    def logged_loss(self, y: torch.Tensor) -> torch.Tensor:
        """The training loss to log for `logits`: the rule's own, else their cross-entropy (an
        extra ~20 us a step)."""
        if self.logits_loss is not None:
            return self.logits_loss.detach()
        return F.cross_entropy(self.logits.detach(), y)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss if isinstance(self.loss, float) else self.loss + loss

    def send(
        self,
        receiver: int,
        tensor: torch.Tensor,
        batch: int,
        delay: int = 0,
        kind: str = ACTIVATION,
        **context: torch.Tensor,
    ) -> None:
        """Send a message; for forward kinds, `delay` is its link's gradient delay (0: live)."""
        self.messages.append(Message(kind, batch, self.sender, receiver, tensor, context=context))
        self.delays.append(int(delay))

    def give_back(self, tensor: torch.Tensor | None, receiver: int, batch: int, delay: int) -> None:
        """After the backward, send the gradient reaching `tensor` to `receiver`."""
        if tensor is not None:
            self.returns.append(Return(tensor, self.sender, receiver, batch, int(delay)))
