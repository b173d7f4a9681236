"""Typed messages between nodes, and the one in-flight protocol every method uses.

A node (one component with its head, student or synthesizer) talks to another only by messages.
Each says what it carries, which data batch it belongs to, who sent it, the sender's step when it
sent it and the sender's weight version at the forward it came from. Those headers are what a
receiver needs to match a late gradient with the stored forward it belongs to, and what a real
multi-process runtime puts on the wire; in the simulator a message is a Python object.

`InFlight` holds messages on their way, each due at a step of its receiver. The simulator delays a
message by queuing it here; a checkpoint saves every message in flight, so a resumed run applies
exactly what the interrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mach_lightning.core.memory import detached, tensor_storages

ACTIVATION = "activation"  # a node's output of a batch, to the node after it
GRADIENT = "gradient"  # dL/d(output) of a batch, back to the node that produced the output
EMBEDDING = "embedding"  # MACH: a node's embedding of a batch, to the nodes consuming it
TARGET = "target"  # DNI: the true gradient at a boundary, the synthesizer's regression target
KINDS = (ACTIVATION, GRADIENT, EMBEDDING, TARGET)
FORWARD_KINDS = (ACTIVATION, EMBEDDING)  # travel forward over links; their gradients come back


@dataclass
class Message:
    """One message: a tensor, what it is, and where and when it comes from."""

    kind: str
    batch: int  # the data batch it belongs to
    sender: int  # node index
    receiver: int  # node index
    tensor: torch.Tensor
    step: int = 0  # the sender's step when it sent the message
    version: int = 0  # the sender's weight version (optimizer steps) at the forward it is from
    context: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. labels, activation
    returned: bool = False  # a forward message: set by the runtime when a gradient came back

    def key(self) -> tuple:
        """Identifies a message in flight; also the order due messages are handed over in."""
        return (self.batch, self.receiver, self.sender, KINDS.index(self.kind), self.step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "batch": self.batch,
            "sender": self.sender,
            "receiver": self.receiver,
            "tensor": self.tensor.detach(),
            "step": self.step,
            "version": self.version,
            "context": detached(self.context),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Message:
        return cls(**{**state, "context": dict(state.get("context", {}))})


class InFlight:
    """Messages on their way, each due at an integer step of its receiver."""

    def __init__(self) -> None:
        # (due step, receiver) -> {key: message}: a step hands over its messages without
        # scanning everything in flight (a deep pipeline holds K x d of them).
        self._due: dict[tuple[int, int], dict[tuple, Message]] = {}

    def send(self, message: Message, due: int) -> None:
        self._due.setdefault((int(due), message.receiver), {})[message.key()] = message

    def take_due(self, step: int, receiver: int | None = None) -> list[Message]:
        """Remove and return the messages due at `step` (for one receiver, or all), in key order:
        a fixed order keeps sums of their effects reproducible."""
        if not self._due:  # the common case of most steps of most methods: nothing in flight
            return []
        slots = [k for k in self._due if k[0] == step] if receiver is None else [(step, receiver)]
        taken: dict[tuple, Message] = {}
        for slot in slots:
            taken.update(self._due.pop(slot, {}))
        return [taken[k] for k in sorted(taken)]

    def _entries(self) -> list[tuple[int, tuple, Message]]:
        return sorted(
            ((due, key, m) for (due, _), box in self._due.items() for key, m in box.items()),
            key=lambda entry: (entry[1], entry[0]),
        )

    def pending(self) -> list[Message]:
        return [m for _, _, m in self._entries()]

    def pending_batches(self) -> set[int]:
        return {m.batch for box in self._due.values() for m in box.values()}

    def receivers_and_batches(self) -> set[tuple[int, int]]:
        """(receiver, batch) of every message in flight."""
        return {(m.receiver, m.batch) for box in self._due.values() for m in box.values()}

    def __len__(self) -> int:
        return sum(len(box) for box in self._due.values())

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"due": due, **m.state_dict()} for due, _, m in self._entries()]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self._due = {}
        for entry in state:
            entry = dict(entry)
            due = entry.pop("due")
            self.send(Message.from_state(entry), due)

    def held_bytes(self) -> int:
        return sum(self.storages().values())

    def storages(self) -> dict[int, int]:
        messages = [(m.tensor, m.context) for box in self._due.values() for m in box.values()]
        return tensor_storages(messages)
