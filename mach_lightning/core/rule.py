"""The rule of a method: its nodes, built from the config, and what one node does on one step.

A method is a `Rule` subclass in one file of `mach_lightning/methods/`, registered with
`@register_topology` (and its config section, if it has settings). The rule builds the modules,
says which node owns which, and writes `node_step(node, inbox) -> Outbox`: the node's loss and
messages on one step. It knows nothing of Lightning, of a global step or of processes: a runtime
(the simulator in `mach_lightning/sim/`, a multi-process one beside it) builds the inboxes, routes
the messages, runs the backward and steps each node's optimizers.

What a runtime may ask a rule besides `node_step`:
  modules()        the nn.Modules to train, by attribute name (their state_dict keys)
  nodes()          the nodes, in the order they step (a node's inputs come from earlier ones)
  optimizer_groups the parameters and optimizer settings of each optimizer, in index order
  eval_logits(x)   the logits to evaluate: "main" (the full model) and "c{i}" per component head
  reads_input(i)   whether node i reads the data input
  state_dict       in-flight state beyond the nodes' stored forwards (e.g. replay buffers)
  component_of     the component a node's diagnostics count under
  end_step         once per step, after every node's backward: forget what nothing can reach
Facts for simulated time are plain attributes: `parallel`, `messages_per_link`, `extra_forwards`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mach_lightning.core.blocks import Component
from mach_lightning.core.node import Inbox, Node, Outbox
from mach_lightning.core.stored import StoredForwards
from mach_lightning.nets import build_backbone

MAIN_HEAD = "main"


class Rule:
    """Base class of every method's rule; see the module doc."""

    name: ClassVar[str] = ""
    diagnostics: ClassVar[bool] = True  # staleness histograms and in-flight memory (diag/*)
    probe: ClassVar[bool] = True  # cosines with the true sync gradient (a chain's; not MACH)
    parallel: ClassVar[bool] = True  # simulated time: components overlap (False: one chain)
    messages_per_link: ClassVar[int] = 2  # simulated time: messages per link per step
    extra_forwards: ClassVar[float] = 0.0  # simulated time: extra forwards per step (replays)

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        self.cfg, self.input_shape, self.num_classes = cfg, tuple(input_shape), num_classes
        self.num_components = int(cfg.model.num_components)

    # ----- structure -----
    def modules(self) -> dict[str, nn.Module]:
        """Modules to train by attribute name; `components` (an nn.ModuleList) is required."""
        raise NotImplementedError

    def nodes(self) -> list[Node]:
        raise NotImplementedError

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], Any]]:
        """(parameters, optim config) per optimizer; default: one per component, optim.*."""
        return [(list(c.parameters()), self.cfg.optim) for c in self.modules()["components"]]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, index: int):
        """Hook to wrap optimizer `index` (e.g. delay compensation) before schedulers attach."""
        return optimizer

    def reads_input(self, index: int) -> bool:
        return index == 0

    def rates(self, active) -> list[float] | None:
        """Simulated time: each component's share of steps it works, given the schedule's
        `active(step)` (None: every step)."""
        return None

    # ----- one step of one node -----
    def node_step(self, node: Node, inbox: Inbox) -> Outbox:
        raise NotImplementedError

    # ----- where nodes run, for a runtime with one process per component -----
    def process_of(self, index: int) -> int:
        """The process that runs node `index`: its component's (nodes sharing a component share
        its process, since they train the same weights)."""
        return index

    def component_of(self, index: int) -> int:
        """The component node `index`'s diagnostics count under (diag/staleness_c{i})."""
        return self.process_of(index)

    def links(self) -> list[tuple[int, int]]:
        """The (sender, receiver) node pairs forward messages travel, senders stepping first;
        gradients and other messages go back along them. Default: a chain, node i to i + 1."""
        indices = [node.index for node in self.nodes()]
        return list(zip(indices, indices[1:]))

    def end_step(self, reachable=None) -> None:
        """Once per step, after every node's backward and follow-ups: forget stored forwards
        that no message can reach any more. `reachable(node, batch)`: a runtime that does not
        see every node (one process of several) says which its nodes must keep; None: this
        runtime sees them all, and the rule's own count decides."""

    # ----- free mode (dist runtime): what a node waits for -----
    free: ClassVar[bool] = False  # the rule runs in runtime.mode=free
    # free mode: a node steps without a forward message that has not arrived by its step (MACH:
    # the teacher's student stands in for the neighbour); else it waits for every one
    free_inputs_optional: ClassVar[bool] = False

    def free_delays(self) -> list[int]:
        """The delays a free-mode run steps with, one per component: 0 keeps a link live (the
        sender waits for its gradient), > 0 decouples it (the gradient is applied when it comes,
        at the staleness the processes' speeds make). Default: every link live."""
        return [0] * self.num_components

    # ----- evaluation -----
    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD]

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for component in self.modules()["components"]:
            x = component(x)
        return {MAIN_HEAD: x}

    # ----- in-flight state beyond the nodes' stored forwards -----
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def held_bytes(self) -> int:
        return 0


class ChainRule(Rule):
    """A rule over the backbone split into K components in a chain, one node each."""

    grad_mode: str | None = None  # set to keep stored forwards (stash | recompute) per node

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        self.components = self.build_components()

    def build_components(self) -> nn.ModuleList:
        blocks = build_backbone(self.cfg.model, self.input_shape, self.num_classes)
        return nn.ModuleList(Component(block, i) for i, block in enumerate(blocks))

    def modules(self) -> dict[str, nn.Module]:
        return {"components": self.components}

    def nodes(self) -> list[Node]:
        if not hasattr(self, "_nodes"):  # built once: nodes hold per-node state
            self._nodes = [self.make_node(i) for i in range(len(self.components))]
        return self._nodes

    def make_node(self, i: int) -> Node:
        component = self.components[i]
        stored = StoredForwards(self.grad_mode, [component]) if self.grad_mode else None
        return Node(i, {"component": component}, optimizers=[i], stored=stored)

    def is_last(self, node: Node) -> bool:
        return node.index == len(self.components) - 1
