"""Messages on the wire: a header per message (what it is, where and when it is from), tensors raw.

A message's header carries its kind, batch id, sender and receiver nodes, the sender's step and
weight version, the step it is due at its receiver, whether its tensors carry a gradient back,
and the keys of its context tensors. Tensors follow in order: the message's own, then its
context's. `None` stands for a tensor that is absent (a live gradient that did not reach a leaf).
"""

from __future__ import annotations

import torch

from mach_lightning.core.messages import Message


def encode(messages: list[tuple[Message, int]]) -> tuple[list[dict], list[torch.Tensor]]:
    """(message, due step) pairs -> headers and the tensors to send after them."""
    headers, tensors = [], []
    for m, due in messages:
        keys = sorted(m.context)
        headers.append(
            {
                "kind": m.kind,
                "batch": m.batch,
                "sender": m.sender,
                "receiver": m.receiver,
                "step": m.step,
                "version": m.version,
                "due": due,
                "grad": [t.requires_grad for t in (m.tensor, *(m.context[k] for k in keys))],
                "keys": keys,
            }
        )
        tensors.extend([m.tensor, *(m.context[k] for k in keys)])
    return headers, tensors


def decode(headers: list[dict], tensors: list[torch.Tensor]) -> list[tuple[Message, int, list]]:
    """Headers and received tensors -> (message, due step, which tensors carried a gradient)."""
    out, at = [], 0
    for h in headers:
        n = 1 + len(h["keys"])
        mine, at = tensors[at : at + n], at + n
        context = dict(zip(h["keys"], mine[1:]))
        m = Message(h["kind"], h["batch"], h["sender"], h["receiver"], mine[0], h["step"])
        m.version, m.context = h["version"], context
        out.append((m, h["due"], h["grad"]))
    return out


def encode_optional(tensors: list[torch.Tensor | None]) -> tuple[list[bool], list[torch.Tensor]]:
    """A list with gaps -> a presence mask and the tensors present."""
    return [t is not None for t in tensors], [t for t in tensors if t is not None]


def decode_optional(mask: list[bool], tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    it = iter(tensors)
    return [next(it) if present else None for present in mask]
