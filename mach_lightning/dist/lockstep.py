"""One process's step in lockstep: its nodes, the simulator's schedule, bundles over the links.

The simulator runs every node in one process with one backward, live autograd edges on the
delay-0 links (sim/driver.py). Here each process runs its own nodes, and every forward message
reaches its receiver as a leaf: the same maths, cut at the links. Per batch step t:

  forward   each node, in the rule's order, waits for a bundle from every node linked to it from
            an earlier process, steps (`rule.node_step`), and sends a bundle (possibly empty) on
            every link out of it. Messages of other kinds go on their way at once, due later.
  backward  each node, in reverse order, waits for the gradients its live (delay-0) messages
            got back, runs its backward (its loss, plus those outputs with their gradients), and
            sends back on every link into it: the gradients its leaves got (live), the late
            gradients of delayed links (GRADIENT messages, due `delay` steps later), and any
            other message for that sender.
Then each node that applied something steps its own optimizers. Bundles between two processes
carry one tag per link and direction, so they are matched however the processes interleave.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mach_lightning.core.memory import detached
from mach_lightning.core.messages import FORWARD_KINDS, GRADIENT, InFlight, Message
from mach_lightning.core.node import Inbox, Outbox, Return
from mach_lightning.dist import wire
from mach_lightning.sim.diagnostics import StalenessTracker


class LockstepProcess:
    """The nodes of process `me` of a rule, and their links to the other processes."""

    def __init__(self, rule, me: int, links: dict):
        self.rule, self.me, self.peers = rule, me, links
        self.nodes = rule.nodes()
        position = {n.index: p for p, n in enumerate(self.nodes)}
        self.process = {n.index: rule.process_of(n.index) for n in self.nodes}  # asked once
        self.component = {n.index: rule.component_of(n.index) for n in self.nodes}
        self.mine = [n for n in self.nodes if self.process[n.index] == me]
        self.node_links = rule.links()
        self.link_id = {pair: k for k, pair in enumerate(self.node_links)}
        self.inbound, self.outbound = defaultdict(list), defaultdict(list)
        for k, (_, r) in sorted(enumerate(self.node_links), key=lambda e: position[e[1][0]]):
            self.inbound[r].append(k)  # in the order the senders step
        for k, (s, _) in sorted(enumerate(self.node_links), key=lambda e: position[e[1][1]]):
            self.outbound[s].append(k)  # in the order the receivers step
        self.in_flight = InFlight()
        self.by_index = {node.index: node for node in self.mine}
        # per outbound link to another process: the batches its receiver's latest answer said it
        # holds a stored forward of (a gradient may still come back for them); None: no answer
        self.remote_holds: dict[int, set[int] | None] = defaultdict(lambda: None)
        # measured from the headers, per component: the age of each gradient applied
        self.staleness = StalenessTracker(1 + max(self.component.values()))

    def local(self, node_index: int) -> bool:
        return self.process[node_index] == self.me

    def peer(self, node_index: int):
        return self.peers[self.process[node_index]]

    # ----- one batch step -----
    def step(self, x, y, t: int, delays: list[int], active) -> dict[int, Outbox]:
        s = _StepState()
        outs = {}
        for node in self.mine:
            outs[node.index] = self._forward(node, s, x, y, t, delays, active)
        for node in reversed(self.mine):
            self._backward(node, outs[node.index], s, t)
        for node in self.mine:
            for follow_up in outs[node.index].after_backward:
                follow_up()
        self.rule.end_step(self.reachable())
        return outs

    def reachable(self):
        """reachable(j, s): whether a message may still come for node j's stored forward of
        batch s: one is in flight here, or a receiver of j's messages holds batch s (it may send
        a gradient on from it), or has not answered for it yet."""
        flying = self.in_flight.receivers_and_batches()

        def keep(j: int, s: int) -> bool:
            # (another process's node stores nothing here)
            if not self.local(j) or (j, s) in flying:
                return True
            return any(self.receiver_holds(k, s) for k in self.outbound[j])

        return keep

    def receiver_holds(self, k: int, s: int) -> bool:
        receiver = self.node_links[k][1]
        if self.local(receiver):
            stored = self.by_index[receiver].stored
            return stored is not None and s in stored.records
        holds = self.remote_holds[k]
        return holds is None or s in holds

    def _forward(self, node, s, x, y, t, delays, active) -> Outbox:
        i = node.index
        for k in self.inbound[i]:
            sender = self.node_links[k][0]
            if not self.local(sender):
                self.receive(k, sender, s, t)
        delivered = [m for k in self.inbound[i] for m in s.received[k]]
        due = self.in_flight.take_due(t, i)
        for m in due:  # measured from the headers: the batch a gradient is of, applied now
            if m.kind == GRADIENT:
                self.staleness.record(self.component[i], t - m.batch)
        inbox = Inbox(
            batch=t,
            x=x if self.rule.reads_input(i) else None,
            y=y,
            step=t,
            delays=delays,
            messages=delivered + due,
            active=active,
        )
        out = self.rule.node_step(node, inbox)
        self.stepped(node, t)
        self._route(out, s, t)
        s.returns[i].extend(out.returns)
        for k in self.outbound[i]:
            receiver = self.node_links[k][1]
            if not self.local(receiver):
                headers, tensors = wire.encode(s.sent[k])
                self.peer(receiver).send_bundle(2 * k, {"messages": headers, "step": t}, tensors)
        return out

    def receive(self, k: int, sender: int, s, t: int) -> None:
        """Lockstep: the bundle on link k of step t, always waited for."""
        header, tensors = self.peer(sender).recv_bundle(2 * k)
        s.arrive_all(k, header, tensors)

    def _route(self, out: Outbox, s, t: int) -> None:
        i = out.sender
        for message, delay in zip(out.messages, out.delays):
            message.step = t
            r = message.receiver
            if message.kind in FORWARD_KINDS:
                k = self._link(i, r, message)
                s.sent[k].append((message, delay))
                if self.local(r):
                    context = [message.context[key] for key in sorted(message.context)]
                    flags = [v.requires_grad for v in (message.tensor, *context)]
                    s.arrive(k, _copy(message), delay, flags)
            else:
                self._send_back(message, t + delay, i, s)

    def _link(self, sender: int, receiver: int, message) -> int:
        k = self.link_id.get((sender, receiver))
        if k is None:
            raise RuntimeError(
                f"{self.rule.name}: node {sender} sent a {message.kind} message to node "
                f"{receiver}, which rule.links() does not list; add the link to the rule."
            )
        return k

    def _send_back(self, message: Message, due: int, frm: int, s) -> None:
        """A message of a non-forward kind: queued here, or back along the link into `frm`."""
        if self.local(message.receiver):
            self.in_flight.send(message, due)
        else:
            s.back[self._link(message.receiver, frm, message)].append((_detached(message), due))

    def stepped(self, node, t: int) -> None:
        """After node_step: nothing to do in lockstep (free mode holds stored forwards)."""

    def await_answer(self, k: int, s, t: int) -> None:
        """Lockstep: the receiver's answer on link k to this step, always waited for."""
        header, tensors = self.peer(self.node_links[k][1]).recv_bundle(2 * k + 1)
        s.answer(k, header, tensors, self.in_flight.send)
        self.remote_holds[k] = set(header["holds"])

    def _backward(self, node, out: Outbox, s, t: int) -> None:
        i = node.index
        for k in self.outbound[i]:
            if not self.local(self.node_links[k][1]):
                self.await_answer(k, s, t)
        roots, grads = [], []
        if out.updates and isinstance(out.loss, torch.Tensor) and out.loss.requires_grad:
            roots.append(out.loss)
            grads.append(torch.ones_like(out.loss))
        for k in self.outbound[i]:
            for (message, delay), back in zip(s.sent[k], s.live[k]):
                for tensor, g in zip(_live_tensors(message, delay), back):
                    if g is not None and tensor is not None and tensor.requires_grad:
                        roots.append(tensor)
                        grads.append(g)
        if roots:
            torch.autograd.backward(roots, grads)
        for r in s.returns[i]:
            if r.tensor.grad is None:
                continue
            r.returned = True
            grad = Message(r.kind, r.batch, r.sender, r.receiver, r.tensor.grad.detach(), t)
            grad.context = dict(r.context)
            if r.message is not None:
                s.returned[self._link(r.receiver, i, grad)].append(r.message.position)
            self._send_back(grad, t + r.delay, i, s)
        for k in self.inbound[i]:
            sender = self.node_links[k][0]
            live = [[leaf.grad if leaf is not None else None for leaf in ls] for ls in s.leaves[k]]
            if self.local(sender):
                s.answer_local(k, live, self.in_flight)
            else:
                header, tensors = s.pack_answer(k, live)
                holds = sorted(node.stored.records) if node.stored is not None else []
                header = {**header, "step": t, "holds": holds}
                self.peer(sender).send_bundle(2 * k + 1, header, tensors)

    def end_step(self) -> None:
        """Lockstep: every send of the step completes before the next step."""
        for link in self.peers.values():
            link.flush()

    def window_metrics(self) -> dict[str, float]:
        """Metrics since the last call (each log step): the staleness measured."""
        return self.staleness.window_metrics()

    def quiesce(self) -> None:
        """Before a checkpoint: nothing left on the wire (in lockstep every step ends so)."""

    # ----- a checkpoint's share of this process (dist/checkpoint.py) -----
    def state_dict(self) -> dict:
        stored = {n.index: n.stored.state_dict() for n in self.mine if n.stored is not None}
        return {
            "in_flight": self.in_flight.state_dict(),
            "stored": stored,
            "staleness": self.staleness.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.in_flight.load_state_dict(state["in_flight"])
        for node in self.mine:
            if node.stored is not None and node.index in state["stored"]:
                node.stored.load_state_dict(state["stored"][node.index])
        self.staleness.load_state_dict(state["staleness"])

    def finish(self, last_step: int) -> None:
        """Every send completed (free mode's steps leave some in flight): a process that exits
        with one unfinished closes its link under the peer still reading it."""
        for link in self.peers.values():
            link.flush()


class _StepState:
    """What one step's nodes sent and received, by node link id."""

    def __init__(self):
        self.sent = defaultdict(list)  # k -> [(sender-side message, delay)]
        self.received = defaultdict(list)  # k -> receiver-side messages (leaves)
        self.leaves = defaultdict(list)  # k -> per message: live leaf per tensor (or None)
        self.live = defaultdict(list)  # k -> per sent message: the gradient per live tensor
        self.back = defaultdict(list)  # k -> [(message, due)] back to the link's sender
        self.returned = defaultdict(list)  # k -> positions of delayed messages answered
        self.returns = defaultdict(list)  # node -> Returns to read after its backward

    def arrive_all(self, k: int, header: dict, tensors: list) -> None:
        for m, delay, grads in wire.decode(header["messages"], tensors):
            self.arrive(k, m, delay, grads)

    def arrive(self, k: int, m: Message, delay: int, grads: list[bool]) -> None:
        """A forward message reaches its receiver: leaves, live or answered `delay` steps on."""
        m.position = len(self.received[k])
        keys = sorted(m.context)  # the wire's order
        leaves = []
        if grads[0]:
            m.tensor = m.tensor.detach().requires_grad_()
            if delay > 0:  # its gradient goes back as a message, due later
                r = Return(m.tensor, m.receiver, m.sender, m.batch, delay, message=m)
                self.returns[m.receiver].append(r)
        leaves.append(m.tensor if grads[0] and delay == 0 else None)
        for key, flag in zip(keys, grads[1:]):  # context tensors stay live, as in the simulator
            if flag:
                m.context[key] = m.context[key].detach().requires_grad_()
            leaves.append(m.context[key] if flag else None)
        self.received[k].append(m)
        self.leaves[k].append(leaves)

    def pack_answer(self, k: int, live: list) -> tuple[dict, list]:
        masks, tensors = [], []
        for grads in live:
            mask, present = wire.encode_optional(grads)
            masks.append(mask)
            tensors.extend(present)
        headers, back_tensors = wire.encode(self.back[k])
        header = {"masks": masks, "returned": self.returned[k], "messages": headers}
        return header, tensors + back_tensors

    def answer(self, k: int, header: dict, tensors: list, deliver) -> None:
        """The receiver's answer on link k: live gradients, answered messages, messages back
        (each handed to `deliver(message, due)`)."""
        self.live[k] = apply_answer(self.sent[k], header, tensors, deliver)

    def answer_local(self, k: int, live: list, in_flight: InFlight) -> None:
        self.live[k] = live
        for position in self.returned[k]:
            self.sent[k][position][0].returned = True
        for m, due in self.back[k]:
            in_flight.send(m, due)


def apply_answer(sent: list, header: dict, tensors: list, deliver) -> list:
    """An answer to the messages `sent` on one link at one step: marks those whose gradient came
    back, delivers the messages it carries; returns the live gradients per sent message."""
    at, live = 0, []
    for mask in header["masks"]:
        n = sum(mask)
        live.append(wire.decode_optional(mask, tensors[at : at + n]))
        at += n
    for position in header["returned"]:
        sent[position][0].returned = True
    for m, due, _ in wire.decode(header["messages"], tensors[at:]):
        deliver(m, due)
    return live


def needs_answer(sent: list) -> bool:
    """Whether the sender's backward needs the answer: a tensor sent live asks for a gradient."""
    return any(
        tensor is not None and tensor.requires_grad
        for message, delay in sent
        for tensor in _live_tensors(message, delay)
    )


def _live_tensors(message: Message, delay: int) -> list:
    """The sender-side tensors whose gradient comes back in this step's backward."""
    main = message.tensor if delay == 0 else None
    return [main, *(message.context[key] for key in sorted(message.context))]


def _copy(message: Message) -> Message:
    m = Message(message.kind, message.batch, message.sender, message.receiver, message.tensor)
    m.step, m.version, m.context = message.step, message.version, dict(message.context)
    return m


def _detached(message: Message) -> Message:
    m = _copy(message)
    m.tensor, m.context = message.tensor.detach(), detached(message.context)
    return m
