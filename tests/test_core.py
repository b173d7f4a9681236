"""The runtime-free core without a Trainer: messages in flight, stored forwards, links, node steps.

Each test drives nodes with the simulator's `LockstepDriver` (or none at all) on tiny inputs and
checks the maths against plain autograd, in milliseconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import mach_lightning.methods  # noqa: F401  (registers the methods and their sections)
from mach_lightning.config import composed_schema
from mach_lightning.core.messages import ACTIVATION, GRADIENT, InFlight, Message
from mach_lightning.core.stored import StoredForwards
from mach_lightning.core.weights import functional_forward
from mach_lightning.methods import rule_class
from mach_lightning.sim.driver import LockstepDriver

IN, CLASSES, BATCH = 6, 3, 4


def rule_of(name: str, *overrides: str):
    cfg = OmegaConf.merge(
        OmegaConf.structured(composed_schema()),
        OmegaConf.from_dotlist(
            [f"topology.name={name}", "model.num_components=3", "model.width=8", "model.depth=2"]
            + ["model.embedding_dim=5", *overrides]
        ),
    )
    torch.manual_seed(0)
    return rule_class(name)(cfg, (IN,), CLASSES)


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, IN, generator=gen), torch.randint(CLASSES, (BATCH,), generator=gen)


def chain(components: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for component in components:
        x = component(x)
    return x


def message(batch_id: int, receiver: int, sender: int = 0, kind: str = GRADIENT) -> Message:
    return Message(kind, batch_id, sender, receiver, torch.full((2,), float(batch_id)))


# ----- messages in flight -----
def test_in_flight_hands_over_only_what_is_due_for_the_receiver_in_key_order():
    queue = InFlight()
    queue.send(message(3, receiver=1), due=5)
    queue.send(message(1, receiver=1), due=5)
    queue.send(message(2, receiver=0), due=5)
    queue.send(message(0, receiver=1), due=6)
    assert [m.batch for m in queue.take_due(5, receiver=1)] == [1, 3]
    assert [m.batch for m in queue.take_due(5)] == [2]
    assert len(queue) == 1 and queue.take_due(5) == []


def test_in_flight_survives_a_state_dict_round_trip():
    queue = InFlight()
    original = message(4, receiver=2, sender=1)
    original.context["labels"] = torch.tensor([1, 2])
    queue.send(original, due=7)
    restored = InFlight()
    restored.load_state_dict(copy.deepcopy(queue.state_dict()))
    (back,) = restored.take_due(7)
    assert (back.kind, back.batch, back.sender, back.receiver) == (GRADIENT, 4, 1, 2)
    assert torch.equal(back.tensor, original.tensor)
    assert torch.equal(back.context["labels"], torch.tensor([1, 2]))


# ----- stored forwards -----
def linear_forward(layer: nn.Linear):
    return lambda w, h: layer(h) if w is None else functional_forward(layer, w[0], h)


@pytest.mark.parametrize("graph_now", [False, True])
def test_stash_gives_the_gradient_at_the_weights_of_the_forward(graph_now):
    torch.manual_seed(0)
    layer, x = nn.Linear(IN, 2), torch.randn(BATCH, IN)
    before = copy.deepcopy(layer)
    stored = StoredForwards("stash", [layer])
    stored.forward(0, linear_forward(layer), (x,), due=2, graph_now=graph_now)
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step in between
    out, _ = stored.replay(0, linear_forward(layer), [False])
    out.sum().backward()
    before(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, before.weight.grad)


def test_a_held_forward_is_due_only_once_released_and_then_at_the_release_step():
    layer, x = nn.Linear(IN, 2), torch.randn(BATCH, IN)
    stored = StoredForwards("recompute", [layer])
    stored.forward(0, linear_forward(layer), (x,), due=2)
    stored.forward(1, linear_forward(layer), (x,), due=3)
    stored.hold(0)  # its gradient comes when it comes (dist free mode)
    assert stored.due(2) == [] and stored.due(3) == [1]
    stored.release(0, 7)
    stored.release(5, 7)  # a batch not stored: nothing to release
    assert stored.due(7) == [0] and len(stored) == 2


def test_recompute_replays_at_the_current_weights_and_collects_the_input_gradient():
    torch.manual_seed(0)
    layer, x = nn.Linear(IN, 2), torch.randn(BATCH, IN)
    stored = StoredForwards("recompute", [layer])
    out = stored.forward(0, linear_forward(layer), (x,), due=1)
    assert out.grad_fn is None  # nothing kept but the input
    with torch.no_grad():
        layer.weight.mul_(2.0)
    replayed, (leaf,) = stored.replay(0, linear_forward(layer), [True])
    replayed.sum().backward()
    torch.testing.assert_close(leaf.grad, layer.weight.sum(0).expand(BATCH, IN))
    assert stored.due(1) == [0] and stored.due(2) == []


def test_a_stashed_forward_rebuilt_after_a_resume_is_bit_identical():
    torch.manual_seed(0)
    layer, x = nn.Linear(IN, 2), torch.randn(BATCH, IN)
    stored = StoredForwards("stash", [layer])
    kept = stored.forward(0, linear_forward(layer), (x,), due=3)
    with torch.no_grad():
        layer.bias.add_(0.5)
    resumed = StoredForwards("stash", [layer])
    resumed.load_state_dict(copy.deepcopy(stored.state_dict()))  # no graph in a checkpoint
    rebuilt, _ = resumed.replay(0, linear_forward(layer), [False])
    assert torch.equal(rebuilt, kept)


# ----- node steps through the simulator's driver -----
def test_sync_nodes_give_exactly_the_backprop_gradients():
    rule = rule_of("sync")
    reference = copy.deepcopy(rule.components)
    x, y = batch()
    driver = LockstepDriver(rule, rule.nodes())
    result = driver.forward(x, y, step=0, delays=[0, 0, 0])
    result.objective.backward()
    F.cross_entropy(chain(reference, x), y).backward()
    for got, expected in zip(rule.components.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad)


def test_a_delayed_link_hands_a_leaf_and_its_gradient_comes_back_when_due():
    rule = rule_of("delayed", "staleness.schedule=list", "staleness.delays=[2,0,0]")
    driver = LockstepDriver(rule, rule.nodes())
    x, y = batch()
    result = driver.forward(x, y, step=0, delays=[2, 0, 0])
    link = result.outboxes[0].messages[0]
    assert link.kind == ACTIVATION and link.tensor.is_leaf and link.tensor.requires_grad
    result.objective.backward()
    driver.after_backward(result, step=0)
    (gradient,) = driver.in_flight.pending()
    header = (gradient.kind, gradient.batch, gradient.sender, gradient.receiver)
    assert header == (GRADIENT, 0, 1, 0)
    assert driver.in_flight.take_due(1) == []  # due at step 0 + 2, not before
    assert driver.in_flight.take_due(2, receiver=0)[0] is gradient
    torch.testing.assert_close(gradient.tensor, link.tensor.grad)


def test_a_delayed_node_applies_the_gradient_of_its_old_batch_at_the_old_weights():
    rule = rule_of("delayed", "staleness.schedule=list", "staleness.delays=[1,0,0]")
    reference = copy.deepcopy(rule.components)
    driver = LockstepDriver(rule, rule.nodes())
    (x0, y0), (x1, y1) = batch(0), batch(1)
    first = driver.forward(x0, y0, step=0, delays=[1, 0, 0])
    assert first.outboxes[0].applied == []  # component 0 waits for batch 0's gradient
    first.objective.backward()
    driver.after_backward(first, step=0)
    with torch.no_grad():  # component 0 moves on before batch 0's gradient arrives
        next(rule.components[0].parameters()).add_(0.1)
    for p in rule.components.parameters():
        p.grad = None
    second = driver.forward(x1, y1, step=1, delays=[1, 0, 0])
    assert second.outboxes[0].applied == [0]
    second.objective.backward()
    F.cross_entropy(chain(reference, x0), y0).backward()
    for got, expected in zip(rule.components[0].parameters(), reference[0].parameters()):
        torch.testing.assert_close(got.grad, expected.grad)
