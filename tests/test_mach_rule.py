"""The MACH rule without a Trainer: one node step, late edges, students, the complete graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mach_lightning.core.messages import EMBEDDING, GRADIENT
from mach_lightning.core.node import Inbox
from mach_lightning.methods import TOPOLOGIES

from .test_mach import BATCH, batch, make, meters, step


def by_index(rule) -> dict:
    return {node.index: node for node in rule.nodes()}


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params]


def test_one_node_step_each_gives_the_wirings_losses_and_gradients(tmp_path):
    rule, _ = make(tmp_path, "mach_seq", 2)
    reference = copy.deepcopy(rule.components)
    x, y = batch()
    nodes = by_index(rule)
    out1 = rule.node_step(nodes[1], Inbox(batch=0, x=x, y=y, step=0, delays=[0, 0]))
    (message,) = out1.messages
    assert (message.kind, message.receiver, out1.delays) == (EMBEDDING, 0, [0])
    inbox = Inbox(batch=0, x=x, y=y, step=0, delays=[0, 0], messages=[message])
    out0 = rule.node_step(nodes[0], inbox)
    # By hand: the child's block on x, the parent's block on x ++ e1 (the MLP's last unit is its
    # head), the parent's student regressing e1.
    parent, child = reference
    e1 = child.block[:-1](x.flatten(1))
    child_loss = F.cross_entropy(child.block[-1](e1), y)
    h0 = parent.block[:-1](torch.cat([x.flatten(1), e1], dim=1))
    distill = F.mse_loss(parent.student(x), e1.detach())
    parent_loss = F.cross_entropy(parent.block[-1](h0), y) + distill
    torch.testing.assert_close(out1.loss, child_loss)
    torch.testing.assert_close(out0.loss, parent_loss)
    torch.testing.assert_close(out0.logits, parent.block[-1](h0))
    assert out0.updates and out1.updates and out0.applied == out1.applied == []
    (out0.loss + out1.loss).backward()  # the live edge: the parent's loss reaches the child
    expected = torch.autograd.grad(parent_loss + child_loss, list(reference.parameters()))
    for got, want in zip(grads(rule.components.parameters()), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_a_late_edge_gives_the_consumer_a_leaf_and_a_gradient_message_due_later(
    tmp_path, grad_mode
):
    rule, driver = make(tmp_path, "mach_seq", 2, f"mach.grad_mode={grad_mode}")
    parent, child = rule.components
    delays = [0, 2]  # the child's embedding reaches the parent at once, its gradient 2 steps late
    x, y = batch(0)
    e = child(x).detach().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(parent.classify(parent(x, e)), y), e)
    result = driver.forward(x, y, 0, delays)
    (message,) = result.outboxes[1].messages
    assert message.tensor.is_leaf and message.tensor.requires_grad  # not the child's graph
    result.objective.backward()
    driver.after_backward(result, 0)
    (sent,) = driver.in_flight.state_dict()
    assert (sent["kind"], sent["batch"], sent["sender"], sent["receiver"]) == (GRADIENT, 0, 0, 1)
    assert sent["due"] == 2
    torch.testing.assert_close(sent["tensor"], g)
    assert step(driver, *batch(1), 1, delays).outboxes[1].applied == []
    child_out = step(driver, *batch(2), 2, delays).outboxes[1]
    assert (child_out.applied, child_out.ages) == ([0], [2])
    # Batch 0's forward is gone once applied; those of batches 1 and 2 wait for their messages.
    assert sorted(by_index(rule)[1].stored.records) == [1, 2]
    assert rule.state_dict() == {"pending": {1: 1, 2: 1}}
    assert sorted(m.batch for m in driver.in_flight.pending()) == [1, 2]


def test_use_student_student_never_waits_on_a_neighbour(tmp_path):
    rule, driver = make(tmp_path, "mach_seq", 3, "mach.use_student=student")
    for t in range(4):  # pipeline delays: both edges late, yet no gradient ever comes back
        step(driver, *batch(t), t, [2, 1, 0])
        assert len(driver.in_flight) == 0
        assert all(len(node.stored) == 0 for node in rule.nodes())
    # The teacher's output and target loss ignore what the neighbour sent (its student's target).
    nodes, x, y = by_index(rule), *batch(9)
    inbox = Inbox(batch=9, x=x, y=y, step=9, delays=[2, 1, 0])
    sent = rule.node_step(nodes[2], inbox).messages
    inbox.messages = sent
    sent = rule.node_step(nodes[1], inbox).messages
    real = sent[0]
    zeros = copy.copy(real)
    zeros.tensor = torch.zeros_like(real.tensor)
    meters(rule)  # empties the meters
    outs, losses = [], []
    for message in (real, zeros):
        inbox.messages = [message]
        outs.append(rule.node_step(nodes[0], inbox))
        losses.append(meters(rule))
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert losses[0]["train/loss_c0"] == losses[1]["train/loss_c0"]
    assert losses[0]["train/distill_c0"] != losses[1]["train/distill_c0"]


def test_a_neighbour_embedding_not_there_yet_is_stood_in_for_by_the_student(tmp_path):
    """Free mode: node 0 steps before node 1's embedding arrives. Its student's imitation is
    the neighbour input, and with no target to imitate there is no distillation loss."""
    rule, _ = make(tmp_path, "mach_seq", 2)
    parent = copy.deepcopy(rule.components[0])
    x, y = batch()
    meters(rule)  # empties the meters
    out = rule.node_step(by_index(rule)[0], Inbox(batch=0, x=x, y=y, step=0, delays=[0, 1]))
    logged = meters(rule)
    expected = F.cross_entropy(parent.classify(parent(x, parent.imitate(x))), y)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, parent.classify(parent(x, parent.imitate(x))))
    assert "train/distill_c0" not in logged and "train/loss_c0" in logged
    assert out.messages == []  # node 0 publishes to nobody in a chain of two


def test_kgraph_trains_each_teacher_on_the_others_standalone_embeddings(tmp_path):
    rule, driver = make(tmp_path, "mach_kgraph", 3)
    reference = copy.deepcopy(rule.components)
    x, y = batch()
    step(driver, x, y, 0, [0, 0, 0])
    imitations = [c.imitate(x) for c in reference]
    published = [c.embed(x, s) for c, s in zip(reference, imitations)]  # f_j(x, s_j(x))
    loss = 0.0
    for i, c in enumerate(reference):
        neighbour = torch.cat([published[j] for j in range(3) if j != i], dim=1)
        loss = loss + F.cross_entropy(c.classify(c.embed(x, neighbour)), y)
        loss = loss + F.mse_loss(imitations[i], neighbour.detach())
    expected = torch.autograd.grad(loss, list(reference.parameters()))
    for got, want in zip(grads(rule.components.parameters()), expected):
        torch.testing.assert_close(got, want)


def test_kgraph_sums_its_consumers_late_gradients_into_one_update(tmp_path):
    rule, driver = make(tmp_path, "mach_kgraph", 3)
    assert [n.index for n in rule.nodes()] == [0, 1, 2, 3, 4, 5]  # publish, then train
    assert [n.optimizers for n in rule.nodes()] == [[0], [1], [2], [], [], []]
    step(driver, *batch(0), 0, [1, 1, 0])
    sent = sorted((m.receiver, m.sender, m.kind) for m in driver.in_flight.pending())
    assert sent == [(0, 4, GRADIENT), (0, 5, GRADIENT), (1, 3, GRADIENT), (1, 5, GRADIENT)]
    result = step(driver, *batch(1), 1, [1, 1, 0])
    for i in (0, 1):
        assert (result.outboxes[i].applied, result.outboxes[i].ages) == ([0], [1])
    assert result.outboxes[2].applied == []


@pytest.mark.parametrize("name", ["mach_single", "mach_seq", "mach_kgraph"])
def test_node_work_is_plain_tuples_one_per_node(tmp_path, name):
    rule, _ = make(tmp_path, name, 3)
    assert TOPOLOGIES[name].diagnostics and not TOPOLOGIES[name].probe
    x, _ = batch()
    works = rule.node_work(x)
    assert len(works) == rule.num_nodes() == (2 if name == "mach_single" else 3)
    for i, (forward, params, size) in enumerate(works):
        assert all(isinstance(out, torch.Tensor) for out in forward())
        assert params and all(isinstance(p, torch.nn.Parameter) for p in params)
        assert size == BATCH * rule.embedding_width(i) * x.element_size()
