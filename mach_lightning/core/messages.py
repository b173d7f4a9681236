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

from mach_lightning.core.memory import detached, tensor_bytes

ACTIVATION = "activation"  # a node's output of a batch, to the node after it
GRADIENT = "gradient"  # dL/d(output) of a batch, back to the node that produced the output
EMBEDDING = "embedding"  # MACH: a node's embedding of a batch, to the nodes consuming it
TARGET = "target"  # DNI: the true gradient at a boundary, the synthesizer's regression target
KINDS = (ACTIVATION, GRADIENT, EMBEDDING, TARGET)


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
        self._due: dict[tuple, tuple[int, Message]] = {}

    def send(self, message: Message, due: int) -> None:
        self._due[message.key()] = (int(due), message)

    def take_due(self, step: int, receiver: int | None = None) -> list[Message]:
        """Remove and return the messages due at `step` (for one receiver, or all), in key order:
        a fixed order keeps sums of their effects reproducible."""
        keys = sorted(
            k
            for k, (due, m) in self._due.items()
            if due == step and (receiver is None or m.receiver == receiver)
        )
        return [self._due.pop(k)[1] for k in keys]

    def pending(self) -> list[Message]:
        return [m for _, (_, m) in sorted(self._due.items())]

    def pending_batches(self) -> set[int]:
        return {m.batch for _, m in self._due.values()}

    def __len__(self) -> int:
        return len(self._due)

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"due": due, **m.state_dict()} for _, (due, m) in sorted(self._due.items())]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self._due = {}
        for entry in state:
            entry = dict(entry)
            due = entry.pop("due")
            self.send(Message.from_state(entry), due)

    def held_bytes(self) -> int:
        return tensor_bytes([(m.tensor, m.context) for _, m in self._due.values()])
