"""The MACH rule: nodes that publish embeddings to each other, one rule for three edge lists.

A *node* is a MACH component (core/mach_blocks.py: teacher, target head, student) or, in
mach_single, the upstream network. Each step every node *publishes* an embedding of the batch to
its consumers, and node i's teacher consumes the concatenation of its neighbours' published
embeddings (its `neighbour` input) or its student's imitation of it, per `mach.use_student`:
  neighbour  train on the real neighbours' embeddings; the student only imitates
  student    train on the student's imitation (the teacher never waits on a neighbour)
  both       one target loss on each, averaged
Each node's loss: target_weight * cross-entropy of its head + student_weight * MSE(student(x),
neighbour input, detached). Evaluation: acc_c{i} is node i standalone, with its student; `main`
(val/acc) is node 0 as trained (its training wiring).

A variant is an edge list (`Edges`): each node's neighbours, the order nodes step in (producers
first), and whether a node publishes its standalone (student-wired) embedding. That one is
computed before anything is consumed, which is how mach_kgraph's cycles are broken: its
embeddings are published in a first round by nodes 0..N-1 (the components' own, holding their
stored forwards and optimizers), and each component's teacher trains in a second round, in
node N + i, on what the first round published.

The gradient of a consumer's loss at producer j's embedding is delayed by d_j (staleness; node j
reads component j's delay). Delay 0: the graph stays connected, so with every delay 0 and
use_student=neighbour this is exactly backprop through the wiring. Delay d > 0: the consumer
gets a leaf, and what reaches it is a GRADIENT message due d steps later, applied by j as
(e * g).sum() through the batch's forward rebuilt from its stored inputs (core/stored.py: with the
weights of that forward, mach.grad_mode=stash, or the current ones, recompute). The rebuilt
forward's neighbour inputs are leaves too, and what reaches them is sent on to those neighbours
(at least one step later), so losses further up still reach every node. A stored forward is
forgotten once no message for its batch is in flight (the rule counts them: `pending`, saved in
checkpoints): nothing can reach it any more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.config import config_section, register_choices, resolve_student_modes
from mach_lightning.core.mach_blocks import Standalone, distillation_loss, reachable_nodes
from mach_lightning.core.messages import EMBEDDING, GRADIENT
from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.rule import MAIN_HEAD, Rule
from mach_lightning.core.stored import GRAD_MODES, StoredForwards
from mach_lightning.core.weights import functional_forward
from mach_lightning.methods.mach_wiring import node_work, wired, wiring

register_choices("mach.grad_mode", lambda: list(GRAD_MODES))


@config_section("mach")
@dataclass
class MachConfig:
    """The MACH family: teachers, target heads and students (mach_lightning/core/mach_blocks.py)."""

    # What each teacher consumes in training: neighbour (the real neighbour's embedding), student
    # (its student's imitation) or both (one target loss on each); a list gives one per component.
    # Evaluation (acc_c{i}) always uses the student. true/false read as student/neighbour.
    use_student: Any = "neighbour"  # neighbour | student | both, or a list, e.g. [both, neighbour]
    target_weight: float = 1.0  # weight of each component's task (cross-entropy) loss
    student_weight: float = 1.0  # weight of each student's distillation (MSE) loss
    student_width: int = 512  # MLP student hidden width
    student_depth: int = 1  # MLP student hidden layers before the embedding layer
    grad_mode: str = "stash"  # late gradients: stash (forward-time weights) | recompute (current)
    upstream_frozen: bool = False  # mach_single: keep the upstream's weights fixed
    upstream_ckpt: str | None = None  # mach_single: start the upstream from a sync checkpoint


@dataclass(frozen=True)
class Edges:
    """A MACH variant's graph."""

    neighbours: tuple[tuple[int, ...], ...]  # per node, the nodes it consumes (concat order)
    order: tuple[int, ...]  # the order nodes step (and publish) in: producers first
    standalone: bool = False  # publish the student-wired embedding, in a first round (cycles)

    def consumers(self, j: int) -> list[int]:
        return [i for i, nbrs in enumerate(self.neighbours) if j in nbrs]


class MachRule(Rule):
    """Base class; a variant builds its components and says its `edges()`."""

    diagnostics = True  # staleness of the applied messages, in-flight memory
    free = True  # free mode: a teacher's student stands in for an embedding not there yet
    free_inputs_optional = True
    probe = False  # the gradient probe compares with a chain's sync gradient: none here

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        self.modes = resolve_student_modes(cfg.mach.use_student, cfg.model.num_components)
        self.grad_mode = cfg.mach.grad_mode
        self.components = self.build_components()
        self.graph = self.edges()
        self.pending: Counter = Counter()  # batch -> gradient messages of it in flight
        self._sent: list = []  # this step's messages and returns, if a gradient reaches them

    # ----- the graph: variants override -----
    def build_components(self) -> nn.ModuleList:
        raise NotImplementedError

    def edges(self) -> Edges:
        raise NotImplementedError

    def num_nodes(self) -> int:
        return len(self.graph.neighbours)

    def neighbours(self, i: int) -> list[int]:
        return list(self.graph.neighbours[i])

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

    # ----- structure for the runtime -----
    def modules(self) -> dict[str, nn.Module]:
        return {"components": self.components}

    def nodes(self) -> list[Node]:
        if not hasattr(self, "_nodes"):  # built once: nodes hold stored forwards and meters
            n, order = self.num_nodes(), list(self.graph.order)
            steps = [*range(n), *(n + i for i in order)] if self.graph.standalone else order
            self._nodes = [self._make_node(i) for i in steps]
        return self._nodes

    def _make_node(self, index: int) -> Node:
        if index >= self.num_nodes():  # mach_kgraph's second round: component i's teacher
            i = index - self.num_nodes()
            return Node(index, {"component": self.components[i]}, optimizers=[])
        modules = self.node_modules(index)  # mach_single's upstream: components 1..K-1
        owned = [self._component_index(m) for m in modules]
        stored = StoredForwards(self.grad_mode, modules)
        component = modules[0] if len(modules) == 1 else nn.ModuleList(modules)
        return Node(index, {"component": component}, owned, stored)

    def _component_index(self, module: nn.Module) -> int:
        return next(k for k, c in enumerate(self.components) if c is module)

    def reads_input(self, index: int) -> bool:
        return True  # every teacher and student reads x

    def free_delays(self) -> list[int]:
        """Every published embedding's gradient comes back as a message (nobody waits on it)."""
        return [1 if self.graph.consumers(j) else 0 for j in range(self.num_components)]

    def process_of(self, index: int) -> int:
        return index % self.num_nodes()  # mach_kgraph's node N + i trains component i

    def links(self) -> list[tuple[int, int]]:
        n, shift = self.num_nodes(), self.num_nodes() if self.graph.standalone else 0
        published = [(j, shift + i) for j in range(n) for i in self.graph.consumers(j)]
        return published + ([(j, n + j) for j in range(n)] if self.graph.standalone else [])

    # ----- one step of one node -----
    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        """Batch t: consume the neighbours' embeddings, learn, publish; late gradients due now."""
        out, t, x, n = Outbox(node.index, stepped=True), inbox.batch, inbox.x, self.num_nodes()
        if self.graph.standalone and node.index < n:  # first round: the student-wired embedding
            imitation = self.imitate(node.index, x)
            live = lambda: self.embed(node.index, x, imitation)  # noqa: E731
            own = self.publish(node, inbox, out, live, [], student=True)
            out.send(n + node.index, own, t, kind=EMBEDDING, imitation=imitation)  # to round 2
        else:  # consume the neighbours' embeddings (or the student's imitation), learn, publish
            i = node.index % n  # mach_kgraph's second round: node N + i trains teacher i
            parts = [inbox.one(EMBEDDING, t, sender=j) for j in self.neighbours(i)]
            late = None in parts  # free mode: a neighbour's embedding not there yet
            parts = [] if late else parts
            neighbour = torch.cat(parts, dim=1) if parts else None
            mode = "student" if late else self.modes[i] if parts else "neighbour"
            mine = [m for m in inbox.take(EMBEDDING, t) if m.sender == i]  # what round 1 sent
            standalone = mine[0].tensor if mine else None
            imitation = mine[0].context["imitation"] if mine else self.imitate(i, x)
            embeddings, student = [], mode == "student"
            for inp in wiring(mode, neighbour, imitation):
                if inp is imitation and standalone is not None:
                    e = standalone
                elif not embeddings and not self.graph.standalone:  # the first one is published
                    live = lambda inp=inp: self.embed(i, x, inp)  # noqa: E731
                    e = self.publish(node, inbox, out, live, parts, student)
                else:
                    e = self.embed(i, x, inp)
                embeddings.append(e)
            self.learn(node, out, i, inbox.y, embeddings, imitation, neighbour)
        self.apply_late_gradients(node, inbox, out)
        return out

    def learn(self, node, out, i, y, embeddings, imitation, neighbour) -> None:
        """Node i's target loss on each wiring and its student's distillation loss."""
        logits = [self.classify(i, e) for e in embeddings]
        if i == 0:
            out.logits = logits[0]  # `main`: node 0 as trained
        if y is None:
            return
        w = self.cfg.mach
        target = sum(F.cross_entropy(z, y) for z in logits) / len(logits)
        out.add_loss(w.target_weight * target)
        node.meter.add(f"train/loss_c{i}", target)
        if imitation is not None and neighbour is not None:
            distill = distillation_loss(imitation, neighbour)
            out.add_loss(w.student_weight * distill)
            node.meter.add(f"train/distill_c{i}", distill)

    def publish(self, node, inbox, out, live, parts: list, student: bool) -> torch.Tensor:
        """Node j's embedding `live()`, sent to its consumers over edges of gradient delay d_j.
        While any edge is late its forward is kept (x, and the neighbours' parts unless the
        student stood in for them): a late gradient, or one a consumer's replay sends on, may
        come back to it."""
        j, t, delays = node.index, inbox.batch, inbox.delays
        consumers = self.graph.consumers(j)
        if not consumers:
            return live()
        if any(delays[k] > 0 for k in range(self.num_nodes()) if self.graph.consumers(k)):
            inputs = (inbox.x,) if student else (inbox.x, *parts)
            fn = lambda w, *_: live()  # noqa: E731  (graph_now: this forward, live weights)
            e = node.stored.forward(t, fn, inputs, t + delays[j], True, student=student)
        else:
            e = live()
        shift = self.num_nodes() if self.graph.standalone else 0
        for i in consumers:
            out.send(shift + i, e, t, delay=delays[j], kind=EMBEDDING)
            if delays[j] > 0:  # the driver hands i a leaf: a message if a gradient reaches it
                self._sent.append(out.messages[-1])
        return e

    def apply_late_gradients(self, node: Node, inbox: Inbox, out: Outbox) -> None:
        """(e * g).sum() through each batch's replayed forward, g summed over its consumers; what
        reaches the replay's neighbour inputs goes on to those neighbours, due max(d_k, 1) later."""
        grads: dict[int, torch.Tensor] = {}
        sent = set()  # one update per batch and sending step (the consumers of one step: one)
        for m in inbox.take(GRADIENT):
            grads[m.batch] = m.tensor if m.batch not in grads else grads[m.batch] + m.tensor
            sent.add((m.batch, m.step))
            self.pending[m.batch] -= 1
        out.ages = [inbox.step - s for s, _ in sorted(sent)]
        for s, g in sorted(grads.items()):
            student = node.stored.meta(s)["student"]
            nbrs = [] if student else self.neighbours(node.index)
            fn = self.replayed(node.index, student)
            e, leaves = node.stored.replay(s, fn, [False] + [True] * len(nbrs))
            out.add_loss((e * g).sum())
            for k, leaf in zip(nbrs, leaves[1:]):
                out.give_back(leaf, k, s, delay=max(inbox.delays[k], 1))
                self._sent.append(out.returns[-1])
            out.applied.append(s)

    def replayed(self, j: int, student: bool):
        """fn(weights, x, *parts): node j's published embedding, rebuilt from stored inputs."""

        def fn(weights, x, *parts):
            neighbour = torch.cat(parts, dim=1) if parts else None
            return self.embed(j, x, neighbour, weights, use_student=student)

        return fn

    def end_step(self, reachable=None) -> None:
        """After the step's backward: count the messages now in flight; forget what none can
        reach. One process of several sees only its own messages, so there `reachable` (the
        runtime's) decides, and the count only keeps batches some node of this process holds."""
        for sent in self._sent:
            if sent.returned:  # the runtime says a gradient reached it
                self.pending[sent.batch] += 1
        self._sent = []
        self.pending = Counter({b: c for b, c in self.pending.items() if c > 0})
        keep = (lambda i, s: s in self.pending) if reachable is None else reachable
        for node in self.nodes():
            if node.stored is not None:
                for s in [s for s in node.stored.records if not keep(node.index, s)]:
                    node.stored.forget(s)
        if reachable is not None:
            held = {s for n in self.nodes() if n.stored is not None for s in n.stored.records}
            self.pending = Counter({b: c for b, c in self.pending.items() if b in held})

    # ----- in-flight state beyond the stored forwards -----
    def state_dict(self) -> dict[str, Any]:
        return {"pending": dict(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = Counter({int(b): int(c) for b, c in state.get("pending", {}).items()})

    # ----- evaluation and simulated time (methods/mach_wiring.py) -----
    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD] + [f"c{i}" for i in range(self.num_nodes())]

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {MAIN_HEAD: wired(self, x, self.modes, set(range(self.num_nodes())))[0]}
        for i in range(self.num_nodes()):
            logits[f"c{i}"] = self.standalone_model(i)(x)
        return logits

    def chain_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Node i fed by its real neighbours, all the way: the full chain its student replaces."""
        nodes = reachable_nodes(self.neighbours, i)
        return wired(self, x, ["neighbour"] * len(self.modes), nodes)[i]

    def node_work(self, x: torch.Tensor) -> list[tuple]:
        return node_work(self, x)
