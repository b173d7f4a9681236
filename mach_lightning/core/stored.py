"""Stored forwards: what a node keeps of a batch's forward until that batch's gradient arrives.

A node whose gradient for batch s arrives d steps late must then backpropagate it through its
forward of s. Two ways to keep that forward (`grad_mode`), defined here once for every method:

  stash      the weights of the forward are kept (a clone: PipeDream's weight stashing). The late
             gradient is exactly the gradient at the weights that did the forward. If the forward
             ran with the clone (`graph_now=False`), its graph is kept too and used as is; else the
             graph is rebuilt from the inputs and the clone (`stashed_params`), bit for bit, which
             is also how a resumed run gets it back. Memory per batch: inputs + one weight copy
             (+ the saved activations of a kept graph).
  recompute  only the inputs are kept; the forward is redone with the current weights when the
             gradient arrives (Features Replay). Memory per batch: the inputs. Cost: one extra
             forward.

`forward` runs a node's forward and keeps what its mode needs; `replay` returns the forward's
output with a graph to the live parameters, and the input leaves whose gradients the node sends
on. A record's inputs, weight copies and metadata go into checkpoints; a kept graph does not.
Replays never move BatchNorm statistics: the batch was counted at its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mach_lightning.core.memory import detached, graph_saved_storages, tensor_storages
from mach_lightning.core.weights import cloned_params, frozen_buffers, stashed_params

GRAD_MODES = ("stash", "recompute")

# forward(weights, *inputs): weights is None (the live parameters) or one dict per module.
Forward = Callable[..., torch.Tensor]


class StoredForwards:
    """One node's stored forwards by batch, with the step each one's update is due at."""

    def __init__(self, grad_mode: str, modules: Sequence[nn.Module]):
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, not {grad_mode!r}")
        self.grad_mode, self.modules = grad_mode, list(modules)
        self.buffers = [b for m in self.modules for b in m.buffers()]  # frozen while replaying
        self.records: dict[int, dict[str, Any]] = {}

    def forward(
        self,
        batch: int,
        fn: Forward,
        inputs: tuple,
        due: int,
        graph_now: bool = False,
        keep_inputs: Sequence[bool] | None = None,
        **meta,
    ) -> torch.Tensor:
        """Run the forward of `batch` and keep it until `due`.

        keep_inputs: which inputs to keep (default all); one that came over a live link need not
        be, as the sender replays the same batch at the same step and hands it over again.

        graph_now=False: the output's graph is only backpropagated at `due` (delayed gradients):
        stash runs the forward with a weight clone and keeps the graph; recompute runs it without
        a graph. graph_now=True: the graph is used this step too (MACH: the node's own loss), so
        it runs with the live weights and is rebuilt at `due`.
        """
        keep = [True] * len(inputs) if keep_inputs is None else keep_inputs
        kept = [detached(i) if k else None for i, k in zip(inputs, keep)]
        record: dict[str, Any] = {"inputs": kept, "due": int(due)}
        record["meta"] = meta
        if self.grad_mode == "stash":
            clones = [cloned_params(m) for m in self.modules]
            record["weights"] = [{n: w.detach() for n, w in c.items()} for c in clones]
            if not graph_now:
                out = fn(clones, *inputs)
                record["_out"], record["_inputs"] = out, list(inputs)
        if graph_now:
            out = fn(None, *inputs)
        elif self.grad_mode == "recompute":
            with torch.no_grad():
                out = fn(None, *inputs)
        self.records[batch] = record
        return out

    def due(self, step: int) -> list[int]:
        """The batches whose update is due at `step`, oldest first."""
        return sorted(b for b, r in self.records.items() if r["due"] == step)

    def hold(self, batch: int) -> None:
        """Due at no step until `release`d: a runtime whose gradients arrive when they arrive
        (dist free mode) replays a forward when its gradient is there, not on a schedule."""
        if batch in self.records:
            self.records[batch]["due"] = None

    def release(self, batch: int, step: int) -> None:
        """Make a held forward due at `step` (its gradient arrived)."""
        if batch in self.records:
            self.records[batch]["due"] = int(step)

    def meta(self, batch: int) -> dict[str, Any]:
        return self.records[batch]["meta"]

    def replay(
        self, batch: int, fn: Forward, grad_inputs: Sequence[bool], inputs: Sequence | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The stored forward's output (graph to the live parameters) and its input leaves.

        `inputs` (optional) replaces stored inputs that are None in it: a predecessor's replay of
        the same batch, so that a zero-delay link stays one autograd graph. `grad_inputs` says
        which stored inputs become leaves that collect a gradient to send on.
        """
        record = self.records[batch]
        if "_out" in record:  # a kept graph (stash): its inputs are the leaves it was built on
            leaves = [i if _collects(i) else None for i in record["_inputs"]]
            return record["_out"], leaves
        given = list(inputs) if inputs is not None else [None] * len(record["inputs"])
        args, leaves = [], []
        for stored, live, wants in zip(record["inputs"], given, grad_inputs):
            if live is not None:
                args.append(live)
                leaves.append(None)
            elif stored is not None and wants:
                leaf = stored.detach().requires_grad_()
                args.append(leaf)
                leaves.append(leaf)
            else:
                args.append(stored)
                leaves.append(None)
        weights = None
        if self.grad_mode == "stash":
            weights = [stashed_params(m, w) for m, w in zip(self.modules, record["weights"])]
        with frozen_buffers(self.buffers):
            return fn(weights, *args), leaves

    def weights(self, batch: int) -> list[dict[str, torch.Tensor]] | None:
        """The weight copy of a stashed forward (DC-ASGD's w_then), None under recompute."""
        return self.records[batch].get("weights")

    def forget(self, batch: int) -> None:
        self.records.pop(batch, None)

    def __len__(self) -> int:
        return len(self.records)

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {
            b: {k: detached(v) for k, v in r.items() if not k.startswith("_")}
            for b, r in sorted(self.records.items())
        }

    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        self.records = {int(b): dict(r) for b, r in state.items()}

    def held_bytes(self) -> int:
        """Bytes of the kept inputs and weight copies, and of what kept graphs saved."""
        return sum(self.storages().values())

    def storages(self) -> dict[int, int]:
        """The storages held (data pointer -> bytes): kept graphs of several nodes may share
        some (one graph through a run of equal delays), so a runtime unions them."""
        storages: dict[int, int] = {}
        for record in self.records.values():
            out = record.get("_out")
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                storages.update(graph_saved_storages(out))
        return tensor_storages(list(self.records.values()), storages)


def _collects(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_leaf and tensor.requires_grad
