"""The simulator's step: every node of a rule, in one process, on one clock, one backward.

Per batch step t: each node steps in the rule's order with an inbox holding the batch, the
forward messages its predecessors sent this step and the messages due for it at t. A forward
message whose link has gradient delay 0 reaches its receiver as is (a live autograd edge); a
delayed one as a leaf, and whatever gradient reaches the leaf in this step's backward goes back to
the sender as a GRADIENT message due `delay` steps later. Other messages (gradients, synthesizer
targets) wait in the in-flight queue until their due step. The nodes' losses are summed and
backpropagated once, so plain DDP all-reduces once per step; a node with nothing to apply adds
0 * its parameters so that DDP sees every parameter used. Then each node that applied something
steps its optimizers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from mach_lightning.core.messages import FORWARD_KINDS, InFlight, Message
from mach_lightning.core.node import Inbox, Node, Outbox, Return


@dataclass
class StepResult:
    """One step of every node: the summed objective and each node's outbox."""

    objective: torch.Tensor | None
    outboxes: dict[int, Outbox] = field(default_factory=dict)
    returns: list[Return] = field(default_factory=list)

    def applied(self) -> dict[int, list[int]]:
        return {i: out.applied for i, out in self.outboxes.items() if out.updates}


class LockstepDriver:
    """Runs a rule's nodes on the simulator's clock; holds the messages in flight."""

    def __init__(self, rule, nodes: list[Node]):
        self.rule, self.nodes = rule, nodes
        self.in_flight = InFlight()
        self._reads = [rule.reads_input(n.index) for n in nodes]  # asked once, not every step
        self.component_of = {n.index: rule.component_of(n.index) for n in nodes}  # diagnostics

    def forward(self, x, y, step: int, delays: list[int], active=None) -> StepResult:
        """Every node's step for batch `step`: outboxes and the objective (no backward yet).
        `active`: the schedule's per-component activity at `step` (None: all work)."""
        delivered: dict[int, list[Message]] = defaultdict(list)
        result, terms = StepResult(objective=None), []
        if active is None:
            active = [True] * len(delays)  # one list for every node's inbox
        for node, reads in zip(self.nodes, self._reads):
            i = node.index
            inbox = Inbox(
                batch=step,
                x=x if reads else None,
                y=y,
                step=step,
                delays=delays,
                messages=delivered.pop(i, []) + self.in_flight.take_due(step, i),
                active=active,
            )
            out = self.rule.node_step(node, inbox)
            result.outboxes[i] = out
            self._route(out, step, delivered, result.returns)
            result.returns.extend(out.returns)
            terms.append(out.loss if out.updates else _unused(node))
        result.objective = _total(terms, x)
        return result

    def _route(self, out: Outbox, step: int, delivered, returns: list[Return]) -> None:
        for message, delay in zip(out.messages, out.delays):
            message.step = step
            if message.kind not in FORWARD_KINDS:
                self.in_flight.send(message, step + delay)
                continue
            tensor = message.tensor
            if delay > 0 and tensor.requires_grad:  # a delayed link: a leaf, its gradient later
                message.tensor = tensor.detach().requires_grad_()
                returns.append(
                    Return(
                        message.tensor,
                        message.receiver,
                        message.sender,
                        message.batch,
                        delay,
                        message=message,
                    )
                )
            delivered[message.receiver].append(message)

    def after_backward(self, result: StepResult, step: int) -> None:
        """Send the gradients that reached returned tensors, then the nodes' own follow-ups."""
        for r in result.returns:
            if r.tensor.grad is None:
                continue
            r.returned = True
            if r.message is not None:
                r.message.returned = True
            grad = r.tensor.grad.detach()
            message = Message(r.kind, r.batch, r.sender, r.receiver, grad, step, context=r.context)
            self.in_flight.send(message, step + r.delay)
        for out in result.outboxes.values():
            for follow_up in out.after_backward:
                follow_up()
        self.rule.end_step()

    # ----- checkpoints -----
    def state_dict(self) -> dict:
        return {
            "in_flight": self.in_flight.state_dict(),
            "stored": {n.index: n.stored.state_dict() for n in self.nodes if n.stored is not None},
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.in_flight.load_state_dict(state.get("in_flight", []))
        stored = state.get("stored", {})
        for node in self.nodes:
            if node.stored is not None:
                node.stored.load_state_dict(stored.get(node.index, {}))
        self.rule.load_state_dict(state.get("rule", {}))

    def held_bytes(self) -> int:
        """Bytes in flight: messages, stored forwards (each storage once) and the rule's own."""
        storages = self.in_flight.storages()
        for node in self.nodes:
            if node.stored is not None:
                storages.update(node.stored.storages())
        return sum(storages.values()) + self.rule.held_bytes()


def _unused(node: Node):
    """0 * every parameter: the node applied nothing, but DDP must see its parameters used."""
    return [0.0 * p.sum() for p in node.parameters() if p.requires_grad]


def _total(terms: list, x: torch.Tensor) -> torch.Tensor:
    flat = []
    for term in terms:
        if isinstance(term, list):
            flat.extend(term)
        elif isinstance(term, torch.Tensor):
            flat.append(term)
    if not flat:
        return x.new_zeros(())
    return flat[0] if len(flat) == 1 else torch.stack(flat).sum()
