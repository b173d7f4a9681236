"""One process's step in free mode: nobody waits longer than its method requires.

Lockstep (dist/lockstep.py) waits, at every step, for exactly what the simulator's schedule
prescribes. Free mode keeps the same step (forward, backward, optimizer steps) and changes only
what is waited for:

  forward    a node still waits for its input bundle (it cannot compute without it);
  answers    the receiver's answer on a link (live gradients, gradients of delayed links, other
             messages back) is read by a helper thread into a queue. The sender waits for it only
             when it sent a tensor live (a delay-0 link, as in sync backprop); otherwise it takes
             whatever has arrived at the start of its next steps, and a gradient is applied the
             step after it arrives, at whatever staleness the processes' speeds make;
  sends      go out without waiting, up to `runtime.queue` in flight per link: a sender at most
             that far ahead of a slow receiver waits for it (a bounded queue, so memory is too).

  inputs     a rule whose nodes can step without an input (`free_inputs_optional`: MACH, whose
             teacher's student stands in for its neighbour) waits for none: a helper thread
             reads each link's bundles, a node takes the one of its step if it has come and
             steps without it otherwise (diag/late_input_frac_c{i}); one that comes later is
             dropped. Its sender then keeps at most `runtime.queue` steps unanswered.

A stored forward (core/stored.py) is held until its gradient arrives and replayed then: the stash
is matched by the message header's batch id. The rule says which links wait: its `free_delays()`
(0: live, the sender waits; > 0: decoupled). The staleness each component applied is measured
from the headers (diag/staleness_c{i}, as the simulator names it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

from mach_lightning.dist.lockstep import LockstepProcess, apply_answer, needs_answer
from mach_lightning.dist.transport import Link, PeerError


class AnswerReader:
    """A helper thread reading the answers on one link into a queue, up to the run's last step."""

    def __init__(self, link: Link, tag: int, last_step: int):
        self.link, self.tag, self.last_step = link, tag, last_step
        self.arrived: queue.Queue = queue.Queue()  # bounded by the sender's queue of forwards
        self.thread = threading.Thread(target=self._read, daemon=True, name=f"answers-{tag}")
        self.thread.start()

    def _read(self) -> None:
        step = -1
        while step < self.last_step:
            try:
                header, tensors = self.link.recv_bundle(self.tag, timed=False)
            except Exception as err:  # noqa: BLE001  (handed to the process's loop, raised there)
                self.arrived.put(err)
                return
            step = int(header["step"])
            self.arrived.put((header, tensors))  # views of a buffer of its own

    def next(self, block: bool):
        """The next answer (None if none has arrived and `block` is false)."""
        try:
            item = self.arrived.get(block=block, timeout=self.link.timeout.total_seconds())
        except queue.Empty:
            if block:
                raise PeerError(self.link.peer, f"no answer within {self.link.timeout}") from None
            return None
        if isinstance(item, Exception):
            raise item
        return item


class ForwardReader(AnswerReader):
    """A helper thread reading the forward bundles on one link; the node takes the one of its
    step if it has come (older ones came too late for their step: dropped)."""

    def __init__(self, link: Link, tag: int, last_step: int):
        self.head = None  # a bundle of a later step, read but not yet due
        self.seen = -1  # the step of the last bundle taken or dropped
        super().__init__(link, tag, last_step)

    def take(self, t: int, block: bool = False):
        """The bundle of step t, or None if it has not come (with `block`: wait until every
        bundle up to step t is off the wire)."""
        while self.seen < t:
            item = self.head if self.head is not None else self.next(block)
            self.head = None
            if item is None:
                return None
            step = int(item[0]["step"])
            if step > t:
                self.head = item
                return None
            self.seen = step
            if step == t:
                return item
        return None


class FreeProcess(LockstepProcess):
    """The nodes of process `me`, in free mode (see the module doc)."""

    def __init__(self, rule, me: int, links: dict, queue_depth: int, last_step: int):
        super().__init__(rule, me, links)
        self.queue_depth = queue_depth
        # nodes whose stored forwards wait for a gradient from another process (asked once)
        self.held = {
            node.index
            for node in self.mine
            if node.stored is not None
            and any(not self.local(self.node_links[k][1]) for k in self.outbound[node.index])
        }
        self.unanswered: dict[int, dict[int, list]] = defaultdict(dict)  # k -> {step: sent}
        self.readers = {
            k: AnswerReader(self.peer(r), 2 * k + 1, last_step)
            for k, (s, r) in enumerate(self.node_links)
            if self.local(s) and not self.local(r)
        }
        self.ahead: dict[int, list] = defaultdict(list)  # k -> answers before their step's send
        self.forwards = {}  # k -> its ForwardReader, on links a node need not wait on
        if rule.free_inputs_optional:
            self.forwards = {
                k: ForwardReader(self.peer(s), 2 * k, last_step)
                for k, (s, r) in enumerate(self.node_links)
                if self.local(r) and not self.local(s)
            }
        self.late = {node.index: [0, 0] for node in self.mine}  # node -> [late inputs, steps]
        self.arrival_step = 0  # the step a message read now is delivered at
        self.current = -1  # the step running (or last run)

    def step(self, x, y, t: int, delays: list[int], active):
        self.arrival_step, self.current = t, t
        for k in self.readers:  # whatever has arrived since the last step
            self._drain(k, until=None)
        return super().step(x, y, t, delays, active)

    def stepped(self, node, t: int) -> None:
        """A stored forward whose gradient comes from another process is replayed when that
        gradient arrives, not on the schedule (one from this process keeps the schedule's step)."""
        if node.index in self.held:
            node.stored.hold(t)

    def receive(self, k: int, sender: int, s, t: int) -> None:
        reader = self.forwards.get(k)
        if reader is None:  # the node cannot step without it
            return super().receive(k, sender, s, t)
        receiver = self.node_links[k][1]
        item = reader.take(t)
        self.late[receiver][0] += item is None
        self.late[receiver][1] += 1
        if item is not None:
            s.arrive_all(k, *item)

    def await_answer(self, k: int, s, t: int) -> None:
        self.unanswered[k][t] = s.sent[k]
        if needs_answer(s.sent[k]):  # a live tensor: its gradient is needed in this backward
            self.arrival_step = t + 1
            s.live[k] = self._drain(k, until=t)
        elif self.rule.free_inputs_optional and len(self.unanswered[k]) > self.queue_depth:
            self._drain(k, until=min(self.unanswered[k]))  # its receiver reads ahead: a bound

    def receiver_holds(self, k: int, s: int) -> bool:
        return s in self.unanswered.get(k, ()) or super().receiver_holds(k, s)

    def _drain(self, k: int, until: int | None):
        """Apply the answers on link k that have arrived (all up to step `until`, waiting for
        them, if given); returns the live gradients of step `until`'s answer."""
        reader, ahead = self.readers[k], self.ahead[k]
        while True:
            if ahead and int(ahead[0][0]["step"]) in self.unanswered[k]:
                item = ahead.pop(0)
            else:
                start = time.perf_counter()
                item = reader.next(block=until is not None)
                reader.link.stats.wait_s += time.perf_counter() - start
                if item is None:
                    return None
            header, tensors = item
            step = int(header["step"])
            if step not in self.unanswered[k]:  # its receiver did not wait for this step's send
                ahead.append(item)  # applied at that step (never before: checkpoints)
                continue
            live = apply_answer(self.unanswered[k].pop(step), header, tensors, self.deliver)
            self.remote_holds[k] = set(header["holds"])
            if step == until:
                return live

    def deliver(self, message, due: int) -> None:
        """A message that came back: to its receiver at once, whatever the schedule said."""
        node = self.by_index.get(message.receiver)
        if node is not None and node.stored is not None:
            node.stored.release(message.batch, self.arrival_step)
        self.in_flight.send(message, self.arrival_step)

    def end_step(self) -> None:
        for link in self.peers.values():
            link.settle(self.queue_depth)

    def quiesce(self) -> None:
        """Before a checkpoint: every answer to the steps run so far read (delivered at the next
        step), every send completed; nothing is then on the wire."""
        self.arrival_step = self.current + 1  # this step's messages have all been taken
        self._drain_all()
        self._skip_forwards(self.current)
        super().end_step()  # lockstep's: every send completed

    def finish(self, last_step: int) -> None:
        """Read every answer still coming (the receivers' last sends complete), then the sends."""
        self.arrival_step = last_step + 1  # too late to apply: the run is over
        self._drain_all()
        self._skip_forwards(last_step)
        for reader in [*self.readers.values(), *self.forwards.values()]:
            reader.thread.join(timeout=reader.link.timeout.total_seconds())
        super().finish(last_step)

    def _skip_forwards(self, step: int) -> None:
        """Wait for (and drop) every forward bundle up to `step` still coming: off the wire."""
        for reader in self.forwards.values():
            reader.take(step, block=True)

    def window_metrics(self) -> dict[str, float]:
        metrics = super().window_metrics()
        for i, (late, steps) in self.late.items():
            if steps and self.forwards:
                metrics[f"diag/late_input_frac_c{self.process[i]}"] = late / steps
            self.late[i] = [0, 0]
        return metrics

    def _drain_all(self) -> None:
        """Wait for and apply the answers to every step sent so far, on every link."""
        for k in self.readers:
            if self.unanswered[k]:
                self._drain(k, until=max(self.unanswered[k]))
