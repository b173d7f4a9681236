"""The MACH family: students, the plain-network limit, delayed parent-to-child gradients, export."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.config import ConfigError, load_config
from mach_lightning.core.blocks import build_optimizer
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer, run_fit
from mach_lightning.methods import TOPOLOGIES
from mach_lightning.sim import create_topology
from mach_lightning.sim.driver import LockstepDriver

from .conftest import tiny_overrides
from .resume_check import resumed_equals_uninterrupted

INPUT_SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 16
SMALL = ("model.width=32", "model.embedding_dim=16", "synth.hidden=24", "mach.student_width=24")


def make_cfg(tmp_path, name: str, k: int, *extra: str):
    overrides = [f"topology.name={name}", f"model.num_components={k}", *SMALL, *extra]
    return load_config(None, tiny_overrides(tmp_path, *overrides))


def make(tmp_path, name: str, k: int, *extra: str):
    """The method's rule alone (no Lightning), driven by a LockstepDriver as the simulator does."""
    cfg = make_cfg(tmp_path, name, k, *extra)
    torch.manual_seed(0)
    rule = TOPOLOGIES[name](cfg, INPUT_SHAPE, CLASSES)
    return rule, LockstepDriver(rule, rule.nodes())


def step(driver, x, y, t: int, delays: list[int]):
    """Batch step t of every node and the one backward (no optimizer step: the test does it)."""
    result = driver.forward(x, y, t, delays)
    result.objective.backward()
    driver.after_backward(result, t)
    return result


def meters(rule) -> dict[str, float]:
    return {k: v for node in rule.nodes() for k, v in node.meter.summary().items()}


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *INPUT_SHAPE, generator=generator), torch.randint(
        0, CLASSES, (BATCH,), generator=generator
    )


class Function(nn.Module):
    """Wraps a callable as a module (to hand a student an exact function)."""

    def __init__(self, fn, owner: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, [owner]  # a list: not registered, no duplicate parameters

    def forward(self, x):
        return self.fn(x)


def test_student_loss_is_zero_when_the_student_is_the_childs_exact_function(tmp_path):
    rule, driver = make(tmp_path, "mach_seq", 3, "staleness.schedule=constant", "staleness.k=0")
    c = rule.components
    c[1].student = Function(lambda x: c[2](x), c[2])  # child of 1 is the leaf: f_2(x)
    c[0].student = Function(lambda x: c[1](x, c[2](x)), c[1])  # child of 0: f_1(x, f_2(x))
    driver.forward(*batch(), 0, [0, 0, 0])
    distill = {k: v for k, v in meters(rule).items() if "distill" in k}
    assert distill == {"train/distill_c0": 0.0, "train/distill_c1": 0.0}


def plain_network_step(blocks: list[nn.Sequential], optimizers, x, y) -> None:
    """The same wiring as a plain network: block_i(x ++ e_{i+1}), one loss per head, backprop."""
    embedding, loss = None, 0.0
    for block in reversed(blocks):
        inputs = x.flatten(1) if embedding is None else torch.cat([x.flatten(1), embedding], 1)
        embedding = block[:-1](inputs)  # the MLP's last unit is its classifier
        loss = loss + F.cross_entropy(block[-1](embedding), y)
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()


def test_without_students_or_delays_teachers_train_like_a_plain_network(tmp_path):
    steps = 4
    cfg = make_cfg(
        tmp_path,
        "mach_seq",
        3,
        "staleness.schedule=constant",
        "staleness.k=0",
        "mach.use_student=false",
        "optim.name=sgd",
        "optim.lr=0.05",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.test_after_fit=false",
        "simtime.enabled=false",
    )
    torch.manual_seed(0)
    model = create_topology(cfg, INPUT_SHAPE, CLASSES)  # the rule, trained by the simulator
    blocks = [copy.deepcopy(c.block) for c in model.components]
    optimizers = [build_optimizer(b.parameters(), cfg.optim) for b in blocks]
    datamodule = create_datamodule(cfg.data, cfg.seed)
    build_trainer(cfg, tmp_path / "run").fit(model, datamodule=datamodule)
    plain_data = create_datamodule(cfg.data, cfg.seed)  # no trainer: serves epoch 0 from its start
    plain_data.setup("fit")
    loader = iter(plain_data.train_dataloader())
    for _ in range(steps):
        plain_network_step(blocks, optimizers, *next(loader))
    for block, component in zip(blocks, model.components):
        for expected, got in zip(block.parameters(), component.block.parameters()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def node_gradients(rule, i: int) -> list[torch.Tensor]:
    return [p.grad.clone() for p in rule.components[i].block.parameters()]


def own_loss_gradients(rule, i: int, x, y) -> tuple:
    params = list(rule.components[i].block.parameters())
    leaf = rule.components[i]
    return torch.autograd.grad(F.cross_entropy(leaf.classify(leaf(x)), y), params)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_parent_gradient_reaches_the_child_one_step_late(tmp_path, grad_mode):
    rule, driver = make(
        tmp_path,
        "mach_seq",
        2,
        "staleness.schedule=constant",
        "staleness.k=1",
        f"mach.grad_mode={grad_mode}",
    )
    parent, child = rule.components
    child_params = list(child.block.parameters())
    (x0, y0), (x1, y1) = batch(0), batch(1)
    # Batch 0 at the weights of step 0: the parent's loss gradient at the child's embedding.
    e0 = child(x0).detach().requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(parent.classify(parent(x0, e0)), y0), e0)
    step(driver, x0, y0, 0, [1, 1])
    torch.testing.assert_close(node_gradients(rule, 1), list(own_loss_gradients(rule, 1, x0, y0)))
    weights_then = {f"block.{n}": p.detach().clone() for n, p in child.block.named_parameters()}
    with torch.no_grad():  # an optimizer step between the two batches
        for p in rule.components.parameters():
            p -= 0.1 * p.grad
    rule.components.zero_grad(set_to_none=True)
    result = step(driver, x1, y1, 1, [1, 1])
    assert {i: out.applied for i, out in result.outboxes.items()} == {0: [], 1: [0]}
    # Batch 0's forward replayed at the weights of step 0 (stash) or the current ones (recompute).
    if grad_mode == "stash":
        weights = {n: w.requires_grad_() for n, w in weights_then.items()}
        replay = torch.func.functional_call(child, weights, (x0,))
        late = torch.autograd.grad((replay * g0).sum(), list(weights.values()), allow_unused=True)
    else:
        late = torch.autograd.grad((child(x0) * g0).sum(), child_params, allow_unused=True)
    late = [torch.zeros_like(p) if g is None else g for p, g in zip(child_params, late)]  # head
    own = own_loss_gradients(rule, 1, x1, y1)
    for got, a, b in zip(node_gradients(rule, 1), own, late):
        torch.testing.assert_close(got, a + b)


def test_student_mode_keeps_the_parents_loss_out_of_the_child(tmp_path):
    rule, driver = make(
        tmp_path,
        "mach_seq",
        2,
        "staleness.schedule=constant",
        "staleness.k=0",
        "mach.use_student=student",
    )
    x, y = batch()
    step(driver, x, y, 0, [0, 0])
    torch.testing.assert_close(node_gradients(rule, 1), list(own_loss_gradients(rule, 1, x, y)))
    assert all(p.grad is not None for p in rule.components[0].student.parameters())


def test_use_student_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="mach.use_student"):
        make(tmp_path, "mach_seq", 2, "mach.use_student=[student,maybe]")


def test_mach_single_distils_from_a_frozen_upstream_loaded_from_sync(tmp_path):
    sync = run_fit(
        load_config(
            None,
            tiny_overrides(
                tmp_path,
                "model.num_components=1",
                *SMALL,
                "trainer.max_steps=2",
                "trainer.test_after_fit=false",
            ),
        )
    )
    ckpt = f"{sync['run_dir']}/checkpoints/last.ckpt"
    rule, driver = make(
        tmp_path, "mach_single", 2, f"mach.upstream_ckpt={ckpt}", "mach.upstream_frozen=true"
    )
    trained = torch.load(ckpt, weights_only=False)["state_dict"]
    upstream = {k: v.clone() for k, v in rule.components[1].state_dict().items()}
    assert all(torch.equal(upstream[k], trained[f"components.0.{k}"]) for k in upstream)
    for t, delays in enumerate(([1, 0], [1, 1])):  # its edge live (the default), then late
        step(driver, *batch(t), t, delays)
    assert all(p.grad is None for p in rule.components[1].parameters())
    assert all(p.grad is not None for p in rule.components[0].student.parameters())
    assert len(driver.in_flight) == 0 and all(len(n.stored) == 0 for n in rule.nodes())


@pytest.mark.slow
def test_resume_with_gradient_messages_in_flight_is_exact(tiny_cfg, monkeypatch):
    at_cut = resumed_equals_uninterrupted(
        tiny_cfg,
        monkeypatch,
        "topology.name=mach_seq",
        "mach.grad_mode=stash",
        "staleness.schedule=constant",
        "staleness.k=1",
        *SMALL,
    )
    # Own-loss messages of batch 15 for nodes 1 and 2, and batch 14's forwarded one for node 2:
    # (batch, receiver, sender, step sent).
    in_flight = at_cut["driver"]["in_flight"]
    assert {m["kind"] for m in in_flight} == {"gradient"}
    assert sorted((m["batch"], m["receiver"], m["sender"], m["step"]) for m in in_flight) == [
        (14, 2, 1, 15),
        (15, 1, 0, 15),
        (15, 2, 1, 15),
    ]
    # Kept: the forwards of the batches a message is on its way for, and nothing else.
    assert at_cut["driver"]["rule"]["pending"] == {14: 1, 15: 2}
    assert {b for stored in at_cut["driver"]["stored"].values() for b in stored} == {14, 15}
