"""Decoupled Parallel Backprop (Huo et al., 2018): each component's backward is d_i steps late.

Every step, batch t goes forward through all components at the current weights. Component i applies
the gradient of batch t - d_i, where d_i comes from the staleness schedule (pipeline: d_i = K-1-i).
The gradient reaching component i for batch s is the one its successor computed from batch s, so a
component can never be less late than its successor: the applied delays are the running maximum of
the schedule's from the top (e.g. a straggler delays everything below it). Consecutive components
with equal delay form a *segment* whose graph is connected, as in sync backprop; between segments
the gradient travels as a tensor message, queued until it is due. Delays are drawn per batch when
it goes forward, so random schedules work too: each batch's gradient is applied exactly once per
component, at s + d_i(s); gradients due at the same step are summed.

grad_mode (see core/inflight.py for the memory cost of each):
  stash      the gradient at the weights that did batch s's forward (a stored graph over cloned
             weights; PipeDream's weight stashing). For any delays this equals the full backprop
             gradient of batch s at the weights of step s, restricted to component i.
  recompute  the forward of batch s is redone from its stored input with the current weights and
             the successor's gradient message is backpropagated through it (Features Replay).

One backward per step: every due segment contributes a scalar -- the loss for the top segment,
(h * g.detach()).sum() for the others -- and `manual_backward` runs once on their sum. Components
with nothing due add 0 * sum(params) so that plain DDP sees every parameter used (one all-reduce).
DC-ASGD (topology.dcasgd_lambda > 0) wraps each component's optimizer; its w_then is the stashed
weights (with recompute the gradient is already at the current weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mach_lightning.config import register_choices
from mach_lightning.core.dcasgd import DCASGD
from mach_lightning.core.inflight import (
    DelayQueue,
    cloned_params,
    frozen_buffers,
    functional_forward,
    stashed_params,
)
from mach_lightning.methods import register_topology
from mach_lightning.sim.diagnostics import StaleDiagnosticsMixin
from mach_lightning.sim.module import TopologyModule
from mach_lightning.sim.simtime import SimLayout
from mach_lightning.sim.staleness import create_schedule

GRAD_MODES = ["stash", "recompute"]
register_choices("topology.grad_mode", lambda: GRAD_MODES)


def causal_delays(delays: list[int]) -> list[int]:
    """Running maximum from the top: no component hears of batch s before its successor did."""
    out, running = [], 0
    for d in reversed(delays):
        running = max(running, int(d))
        out.append(running)
    return out[::-1]


def segments(delays: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, delay) runs of consecutive components with equal delay."""
    runs: list[tuple[int, int, int]] = []
    for i, d in enumerate(delays):
        if runs and runs[-1][2] == d:
            runs[-1] = (runs[-1][0], i, d)
        else:
            runs.append((i, i, d))
    return runs


@register_topology
class Delayed(StaleDiagnosticsMixin, TopologyModule):
    """Delayed-gradient backprop with per-component staleness; grad_mode stash or recompute."""

    name = "delayed"

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        self.schedule = create_schedule(cfg.staleness, cfg.model.num_components, cfg.seed)
        self.grad_mode = cfg.topology.grad_mode
        self.queue = DelayQueue()
        self.init_diagnostics()

    # ----- configuration hooks -----
    def wrap_optimizer(self, optimizer, index: int):
        t = self.cfg.topology
        if t.dcasgd_lambda > 0 or t.dcasgd_lr_scaling:
            return DCASGD(optimizer, t.dcasgd_lambda, t.dcasgd_lr_scaling)
        return optimizer

    def sim_layout(self) -> SimLayout:
        return SimLayout(
            parallel=True,
            messages_per_link=2,
            extra_forwards=1.0 if self.grad_mode == "recompute" else 0.0,
        )

    def inflight_bytes(self) -> int:
        return self.queue.held_bytes()

    # ----- the step -----
    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.batch_step
        logits, loss = self._forward_and_enqueue(x, y, step)
        due = self.queue.due(step)
        surrogate, applied = self._surrogate(due, step)
        measured = None
        if self.probe.is_due(step):  # the weights are still those of step t
            batches = {i: [it["batch"] for it in items] for i, items in applied.items()}
            measured = self.probe.measure(step, self.components, x, y, batches)
        optimizers = self.component_optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(surrogate)
        self._send_gradients_down(due)
        self._step_optimizers(optimizers, applied, step)
        if measured is not None:
            self.probe_metrics = self.probe.compare(measured, self.components, applied)
        self.probe.forget(step)
        return {"loss": loss.detach(), "logits": logits.detach()}

    def _forward_and_enqueue(self, x, y, step: int):
        """Batch `step` forward through every component; each segment's in-flight item queued."""
        h, prev_start = x, -1
        last = len(self.components) - 1
        delays = causal_delays(self.schedule.delays(step))
        self.probe.keep(step, x, y, [step + d for d in delays])
        for start, end, delay in segments(delays):
            item: dict[str, Any] = {
                "batch": step,
                "start": start,
                "end": end,
                "prev": prev_start,
                "input": h.detach(),
            }
            if end == last:
                item["target"] = y
            if delay == 0:
                h = self._run_segment(item, weights=None)
            elif self.grad_mode == "stash":
                weights = [cloned_params(self.components[i]) for i in range(start, end + 1)]
                item["weights"] = [{n: w.detach() for n, w in ws.items()} for ws in weights]
                h = self._run_segment(item, weights)
            else:
                with torch.no_grad():
                    h = self._run_blocks(start, end, h)
            self.queue.push((step, start), step + delay, item)
            prev_start, h = start, h.detach()
        top = self.queue.get((step, prev_start))
        loss = top["_out"] if "_out" in top else F.cross_entropy(h, y)
        return h, loss

    def _run_blocks(self, start: int, end: int, h, weights=None):
        for i in range(start, end + 1):
            component = self.components[i]
            h = (
                component(h)
                if weights is None
                else functional_forward(component, weights[i - start], h)
            )
        return h

    def _run_segment(self, item: dict, weights):
        """Build the segment's graph from its input; keep the input leaf and the scalar/output."""
        leaf = item["input"].detach().requires_grad_(item["start"] > 0)
        h = self._run_blocks(item["start"], item["end"], leaf, weights)
        item["_leaf"] = leaf
        item["_out"] = F.cross_entropy(h, item["target"]) if "target" in item else h
        return h

    def _rebuild(self, item: dict) -> None:
        """The graph of a due item: stashed weights (after a resume) or current ones (recompute)."""
        start, end = item["start"], item["end"]
        weights = None
        if self.grad_mode == "stash":
            weights = [
                stashed_params(self.components[i], item["weights"][i - start])
                for i in range(start, end + 1)
            ]
        with frozen_buffers(self.components[start : end + 1]):  # its forward already counted
            self._run_segment(item, weights)

    def _surrogate(self, due, step: int):
        """One scalar whose gradient is every due update; which items each component applies."""
        terms, applied = [], {}
        for _, item in due:
            if "_out" not in item:
                self._rebuild(item)
            out = item["_out"]
            terms.append(out if "target" in item else (out * item["grad"]).sum())
            for i in range(item["start"], item["end"] + 1):
                applied.setdefault(i, []).append(item)
                self.staleness.record(i, step - item["batch"])
        for i, component in enumerate(self.components):
            if i not in applied:  # nothing due (warm-up, random delays): zero, but DDP sees it
                terms.extend(0.0 * p.sum() for p in component.parameters())
        return (terms[0] if len(terms) == 1 else torch.stack(terms).sum()), applied

    def _send_gradients_down(self, due) -> None:
        """The gradient at each segment's input is the message its predecessor will apply."""
        for key, item in due:
            if item["start"] > 0:
                below = self.queue.get((item["batch"], item["prev"]))
                below["grad"] = item["_leaf"].grad.detach()
            self.queue.pop(key)

    def _step_optimizers(self, optimizers, applied: dict, step: int) -> None:
        for i in sorted(applied):
            optimizer = optimizers[i]
            inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps it
            if isinstance(inner, DCASGD):
                items = applied[i]
                staleness = sum(step - it["batch"] for it in items) / len(items)
                inner.set_stale_weights(self._stale_weights(i, items), staleness)
            optimizer.step()

    def _stale_weights(self, index: int, items: list[dict]) -> list:
        """w_then per parameter: the stashed weights (mean if several batches are due at once)."""
        names = [n for n, _ in self.components[index].named_parameters()]
        if self.grad_mode != "stash" or any("weights" not in it for it in items):
            return [None] * len(names)  # computed at the current weights: nothing to compensate
        snaps = [it["weights"][index - it["start"]] for it in items]
        return [torch.stack([s[n] for s in snaps]).mean(0) for n in names]

    # ----- checkpoints -----
    def topology_state_dict(self) -> dict[str, Any]:
        return {**super().topology_state_dict(), "queue": self.queue.state_dict()}

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        super().load_topology_state_dict(state)
        self.queue.load_state_dict(state.get("queue", []))
