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

from .conftest import tiny_overrides
from .resume_check import resumed_equals_uninterrupted
from .test_dni import SMALL

INPUT_SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 16


def make(tmp_path, name: str, k: int, *extra: str):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path, f"topology.name={name}", f"model.num_components={k}", *SMALL, *extra
        ),
    )
    torch.manual_seed(0)
    return TOPOLOGIES[name](cfg, INPUT_SHAPE, CLASSES)


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
    model = make(tmp_path, "mach_seq", 3, "staleness.schedule=constant", "staleness.k=0")
    c = model.components
    c[1].student = Function(lambda x: c[2](x), c[2])  # child of 1 is the leaf: f_2(x)
    c[0].student = Function(lambda x: c[1](x, c[2](x)), c[1])  # child of 0: f_1(x, f_2(x))
    model.wire(*batch(), delays=[0, 0, 0])
    distill = {k: v for k, v in model.meter.summary().items() if "distill" in k}
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
    model = make(
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
    cfg = model.cfg
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


def node_gradients(model, i: int) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.components[i].block.parameters()]


def own_loss_gradients(model, i: int, x, y) -> tuple:
    params = list(model.components[i].block.parameters())
    leaf = model.components[i]
    return torch.autograd.grad(F.cross_entropy(leaf.classify(leaf(x)), y), params)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_parent_gradient_reaches_the_child_one_step_late(tmp_path, grad_mode):
    model = make(
        tmp_path,
        "mach_seq",
        2,
        "staleness.schedule=constant",
        "staleness.k=1",
        f"topology.grad_mode={grad_mode}",
    )
    parent, child = model.components
    child_params = list(child.block.parameters())
    (x0, y0), (x1, y1) = batch(0), batch(1)
    # Batch 0 at the weights of step 0: the parent's loss gradient at the child's embedding.
    e0 = child(x0).detach().requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(parent.classify(parent(x0, e0)), y0), e0)
    objective, wiring, applied = model.step_objective(x0, y0)
    objective.backward()
    model.after_backward(wiring, applied)
    torch.testing.assert_close(node_gradients(model, 1), list(own_loss_gradients(model, 1, x0, y0)))
    weights_then = {f"block.{n}": p.detach().clone() for n, p in child.block.named_parameters()}
    with torch.no_grad():  # an optimizer step between the two batches
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.batch_step = 1
    model.zero_grad(set_to_none=True)
    objective, wiring, applied = model.step_objective(x1, y1)
    objective.backward()
    assert [(b, j) for b, j, _ in applied] == [(0, 1)]
    # Batch 0's forward replayed at the weights of step 0 (stash) or the current ones (recompute).
    if grad_mode == "stash":
        weights = {n: w.requires_grad_() for n, w in weights_then.items()}
        replay = torch.func.functional_call(child, weights, (x0,))
        late = torch.autograd.grad((replay * g0).sum(), list(weights.values()), allow_unused=True)
    else:
        late = torch.autograd.grad((child(x0) * g0).sum(), child_params, allow_unused=True)
    late = [torch.zeros_like(p) if g is None else g for p, g in zip(child_params, late)]  # head
    own = own_loss_gradients(model, 1, x1, y1)
    for got, a, b in zip(node_gradients(model, 1), own, late):
        torch.testing.assert_close(got, a + b)


def test_student_mode_keeps_the_parents_loss_out_of_the_child(tmp_path):
    model = make(
        tmp_path,
        "mach_seq",
        2,
        "staleness.schedule=constant",
        "staleness.k=0",
        "mach.use_student=student",
    )
    x, y = batch()
    objective, _, _ = model.step_objective(x, y)
    objective.backward()
    torch.testing.assert_close(node_gradients(model, 1), list(own_loss_gradients(model, 1, x, y)))
    assert all(p.grad is not None for p in model.components[0].student.parameters())


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
    model = make(
        tmp_path, "mach_single", 2, f"mach.upstream_ckpt={ckpt}", "mach.upstream_frozen=true"
    )
    trained = torch.load(ckpt, weights_only=False)["state_dict"]
    upstream = {k: v.clone() for k, v in model.components[1].state_dict().items()}
    assert all(torch.equal(upstream[k], trained[f"components.0.{k}"]) for k in upstream)
    objective, _, _ = model.step_objective(*batch())
    objective.backward()
    assert all(p.grad is None for p in model.components[1].parameters())
    assert all(p.grad is not None for p in model.components[0].student.parameters())


@pytest.mark.slow
def test_resume_with_gradient_messages_in_flight_is_exact(tiny_cfg, monkeypatch):
    at_cut = resumed_equals_uninterrupted(
        tiny_cfg,
        monkeypatch,
        "topology.name=mach_seq",
        "topology.grad_mode=stash",
        "staleness.schedule=constant",
        "staleness.k=1",
        *SMALL,
    )
    # Own-loss messages of batch 15 for nodes 1 and 2, and batch 14's forwarded one for node 2.
    assert sorted(tuple(m["key"]) for m in at_cut["messages"]) == [
        (14, 2, 15),
        (15, 1, 15),
        (15, 2, 15),
    ]
