"""What mach_single, mach_seq and mach_kgraph share: nodes that publish embeddings to each other.

A *node* is a MACH component (core/mach_blocks.py: teacher, target head, student) or, in
mach_single, the upstream network. Each step, every node *publishes* an embedding of the batch,
and node i's teacher consumes the concatenation of its neighbours' published embeddings (its
`neighbour` input) or its student's imitation of it, per `mach.use_student`:
  neighbour  train on the real neighbours' embeddings; the student only imitates
  student    train on the student's imitation (the teacher never waits on a neighbour)
  both       one target loss on each, averaged
Each node's loss: target_weight * cross-entropy of its head + student_weight * MSE(student(x),
neighbour input, detached). Evaluation: acc_c{i} is node i standalone, with its student; `main`
(val/acc) is node 0 as trained (its training wiring).

Gradients from a consumer to the node it consumed (parent to child) are delayed by the child's
d_j (staleness.schedule; node j reads component j's delay). Delay 0: the graph stays connected,
so with every delay 0 and use_student=neighbour this is exactly backprop through the wiring.
Delay d > 0: the consumer sees a detached copy; after the backward its gradient is a message,
queued (engine DelayQueue) and applied by the child d steps later as (e * g).sum() through the
batch's forward rebuilt from its stored input: with the weights of that forward (grad_mode=stash)
or the current ones (recompute). The rebuilt forward's own neighbour input is a leaf too, and what
reaches it is forwarded to that neighbour (at least one step later), so losses further up still
reach every node. Memory in flight: per batch and node, its input (and a weight copy for stash).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.config import resolve_student_modes
from mach_lightning.core.inflight import (
    DelayQueue,
    frozen_buffers,
    functional_forward,
    stashed_params,
)
from mach_lightning.core.mach_blocks import (
    Standalone,
    Wiring,
    distillation_loss,
    node_work,
    reachable_nodes,
)
from mach_lightning.methods.dni import WindowMeans
from mach_lightning.sim.diagnostics import StaleDiagnosticsMixin
from mach_lightning.sim.module import MAIN_HEAD, TopologyModule
from mach_lightning.sim.simtime import SimLayout
from mach_lightning.sim.staleness import create_schedule


class MachTopology(StaleDiagnosticsMixin, TopologyModule):
    """Base class; subclasses define the nodes' neighbours and the order they publish in."""

    publish_standalone: ClassVar[bool] = False  # True: publish student-wired embeddings (cycles)

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        self.modes = resolve_student_modes(cfg.mach.use_student, cfg.model.num_components)
        self.schedule = create_schedule(cfg.staleness, cfg.model.num_components, cfg.seed)
        self.grad_mode = cfg.topology.grad_mode
        self.messages, self.stored = DelayQueue(), DelayQueue()
        self.meter = WindowMeans()
        self.init_diagnostics()

    # ----- the graph: subclasses override -----
    def num_nodes(self) -> int:
        return len(self.components)

    def neighbours(self, i: int) -> list[int]:
        raise NotImplementedError

    def publish_order(self) -> list[int]:
        return list(range(self.num_nodes()))

    def node_modules(self, i: int) -> list[nn.Module]:
        return [self.components[i]]

    def embed(self, i, x, neighbour, weights=None, use_student=False) -> torch.Tensor:
        """Node i's embedding of x given its neighbour input (weights: stashed, for a rebuild)."""
        component = self.components[i]
        if weights is None:
            return component(x, neighbour, use_student)
        return functional_forward(component, weights[0], x, neighbour, use_student)

    def classify(self, i: int, embedding: torch.Tensor) -> torch.Tensor:
        return self.components[i].classify(embedding)

    def imitate(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        return self.components[i].imitate(x)

    def embedding_width(self, j: int) -> int:
        return self.components[j].embedding_dim

    def standalone_model(self, i: int) -> nn.Module:
        """Node i as a model of x alone (with its student): what mach_lightning.export saves."""
        return Standalone(self.components[i])

    def consumers(self, j: int) -> list[int]:
        return [i for i in range(self.num_nodes()) if j in self.neighbours(i)]

    def edge_delay(self, j: int, delays: list[int]) -> int:
        return int(delays[j])

    # ----- forward through the wiring -----
    def wire(self, x, y=None, delays=None, modes=None, nodes=None) -> Wiring:
        """Nodes publish in order; losses when y is given; delayed edges cut when delays given."""
        modes, delays = modes or self.modes, delays or [0] * len(self.modes)
        nodes = set(range(self.num_nodes())) if nodes is None else nodes
        cut = any(self.edge_delay(j, delays) > 0 for j in nodes if self.consumers(j))
        # Students run when they feed a teacher or, in training, learn (distillation).
        imitations = {
            i: self.imitate(i, x)
            if y is not None or self.publish_standalone or modes[i] != "neighbour"
            else None
            for i in nodes
        }
        shared, wiring, own = {}, Wiring(), {}
        if self.publish_standalone:
            for j in sorted(nodes):
                own[j] = self.embed(j, x, imitations[j])
                store = (x, "student", None) if cut else None
                self._publish(j, own[j], shared, wiring, delays, store)
        for i in [i for i in self.publish_order() if i in nodes]:
            nbrs = self.neighbours(i)
            neighbour = torch.cat([shared[j] for j in nbrs], dim=1) if nbrs else None
            mode = modes[i] if neighbour is not None else "neighbour"
            embedding, logits, loss = self._node(
                i, x, y, mode, neighbour, imitations[i], own.get(i)
            )
            wiring.objective = wiring.objective + loss
            wiring.logits[i] = logits
            if not self.publish_standalone:
                kind = "student" if mode == "student" else "neighbour"
                store = (x, kind, neighbour) if cut else None
                self._publish(i, embedding, shared, wiring, delays, store)
        return wiring

    def _node(self, i, x, y, mode, neighbour, imitation, standalone):
        """Node i's training embedding and logits, and its weighted loss (0 without labels)."""
        both = [neighbour, imitation]
        inputs = both[:1] if mode == "neighbour" else both[1:] if mode == "student" else both
        inputs = inputs if y is not None else inputs[:1]  # evaluation: the first wiring only
        embeddings = [
            standalone if inp is imitation and standalone is not None else self.embed(i, x, inp)
            for inp in inputs
        ]
        logits = [self.classify(i, e) for e in embeddings]
        if y is None:
            return embeddings[0], logits[0], 0.0
        w = self.cfg.mach
        target = sum(F.cross_entropy(out, y) for out in logits) / len(logits)
        loss = w.target_weight * target
        self.meter.add(f"train/loss_c{i}", target)
        if imitation is not None and neighbour is not None:
            distill = distillation_loss(imitation, neighbour)
            loss = loss + w.student_weight * distill
            self.meter.add(f"train/distill_c{i}", distill)
        return embeddings[0], logits[0], loss

    def _publish(self, j, embedding, shared, wiring, delays, store) -> None:
        """What consumers of node j see: the embedding itself, or a leaf if its edge is delayed."""
        delay = self.edge_delay(j, delays)
        if not self.consumers(j):
            return
        shared[j] = embedding
        if delay > 0 and embedding.requires_grad:
            shared[j] = embedding.detach().requires_grad_()
            wiring.leaves[j] = (shared[j], delay)
        if store is not None:
            self._store_forward(j, *store)

    def _store_forward(self, j: int, x, kind: str, neighbour) -> None:
        item: dict[str, Any] = {
            "x": x.detach(),
            "kind": kind,
            "neighbour": None if neighbour is None else neighbour.detach(),
        }
        if self.grad_mode == "stash":
            item["weights"] = [
                {n: p.detach().clone() for n, p in m.named_parameters()}
                for m in self.node_modules(j)
            ]
        self.stored.push((self.batch_step, j), -1, item)

    # ----- training -----
    def step_objective(self, x, y):
        """The scalar whose one backward trains every node, the wiring, and the messages applied."""
        wiring = self.wire(x, y, self.schedule.delays(self.batch_step))
        arrived, applied = self._arrived_messages(self.batch_step)
        return wiring.objective + arrived, wiring, applied

    def after_backward(self, wiring: Wiring, applied: list) -> None:
        self._send_messages(wiring.leaves, applied, self.batch_step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        objective, wiring, applied = self.step_objective(x, y)
        optimizers = self.component_optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(objective)
        self.after_backward(wiring, applied)
        for optimizer in optimizers:
            optimizer.step()
        logits = wiring.logits[0].detach()
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def _arrived_messages(self, step: int):
        """(e * g).sum() for every gradient message due now, through its batch's rebuilt forward."""
        terms, applied = [], []
        for key, message in self.messages.due(step):
            self.messages.pop(key)
            batch, j = key[0], key[1]
            embedding, leaf = self._rebuild(j, self.stored.get((batch, j)))
            terms.append((embedding * message["grad"]).sum())
            applied.append((batch, j, leaf))
            self.staleness.record(j, step - batch)
        return (torch.stack(terms).sum() if terms else 0.0), applied

    def _rebuild(self, j: int, item: dict):
        """Node j's published embedding of a stored batch; its neighbour input as a leaf."""
        modules = self.node_modules(j)
        weights = None
        if self.grad_mode == "stash":
            weights = [stashed_params(m, snap) for m, snap in zip(modules, item["weights"])]
        leaf = None
        if item["neighbour"] is not None:
            leaf = item["neighbour"].detach().requires_grad_()
        with frozen_buffers(nn.ModuleList(modules)):  # this batch's statistics already counted
            embedding = self.embed(
                j, item["x"], leaf, weights, use_student=item["kind"] == "student"
            )
        return embedding, leaf

    def _send_messages(self, leaves: dict, applied: list, step: int) -> None:
        """Queue this step's gradient messages; forget stored forwards no message can reach."""
        for j, (leaf, delay) in leaves.items():
            if leaf.grad is not None:
                self.messages.push((step, j, step), step + delay, {"grad": leaf.grad.detach()})
        delays = self.schedule.delays(step)
        for batch, j, leaf in applied:
            if leaf is None or leaf.grad is None:
                continue
            start = 0
            for k in self.neighbours(j):  # the leaf is the concatenation of j's neighbours
                width = self.embedding_width(k)
                grad = leaf.grad[:, start : start + width].detach()
                start += width
                due = step + max(self.edge_delay(k, delays), 1)
                self.messages.push((batch, k, step), due, {"grad": grad})
        pending = {key[0] for key in self.messages.items}
        for key in [k for k in self.stored.items if k[0] not in pending]:
            self.stored.pop(key)

    # ----- evaluation -----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wire(x).logits[0]

    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD] + [f"c{i}" for i in range(self.num_nodes())]

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {MAIN_HEAD: self(x)}
        for i in range(self.num_nodes()):
            logits[f"c{i}"] = self.standalone_model(i)(x)
        return logits

    def chain_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Node i fed by its real neighbours, all the way: the full chain its student replaces."""
        modes = ["neighbour"] * len(self.modes)
        return self.wire(x, modes=modes, nodes=reachable_nodes(self.neighbours, i)).logits[i]

    # ----- simulated time, logging, checkpoints -----
    def sim_layout(self) -> SimLayout:
        return SimLayout(parallel=True)  # embeddings one way, delayed gradients the other

    def on_train_batch_start(self, batch, batch_idx) -> None:
        x, step = batch[0], self.batch_step
        if self.sim_clock.due(step):  # each node's own work, not a chain; the base then skips
            self.sim_clock.measure_work(self, lambda: node_work(self, x), x.device, step)
        super().on_train_batch_start(batch, batch_idx)

    def step_metrics(self, at_log_point: bool) -> dict[str, float]:
        metrics = super().step_metrics(at_log_point)
        if at_log_point:
            metrics.update(self.meter.summary())
        return metrics

    def inflight_bytes(self) -> int:
        return self.messages.held_bytes() + self.stored.held_bytes()

    def topology_state_dict(self) -> dict[str, Any]:
        return {
            **super().topology_state_dict(),
            "messages": self.messages.state_dict(),
            "stored": self.stored.state_dict(),
        }

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        super().load_topology_state_dict(state)
        self.messages.load_state_dict(state.get("messages", []))
        self.stored.load_state_dict(state.get("stored", []))
