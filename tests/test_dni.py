"""Synthetic gradients (dni, cdni): regression targets, an untouched base model, oracle = sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mach_lightning.config import load_config
from mach_lightning.core.synth import GradientSynthesizer
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.methods import TOPOLOGIES, create_topology
from mach_lightning.methods.dni import DNI

from .conftest import fit_cli, tiny_overrides
from .resume_check import resumed_equals_uninterrupted

INPUT_SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 16
# Small nets: the maths is the same at any size, and the tests stay fast.
SMALL = ("model.width=32", "model.embedding_dim=16", "synth.hidden=24", "mach.student_width=24")


def make_dni(tmp_path, *extra: str, name: str = "dni", cls=None):
    overrides = [f"topology.name={name}", "model.num_components=3", *SMALL, *extra]
    cfg = load_config(None, tiny_overrides(tmp_path, *overrides))
    torch.manual_seed(0)
    model = (cls or TOPOLOGIES[name])(cfg, INPUT_SHAPE, CLASSES)
    for synthesizer in model.synthesizers:  # a learnt synthesizer: predictions are not all zero
        torch.nn.init.normal_(synthesizer.net[-1].weight, std=0.1)
    return model


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *INPUT_SHAPE, generator=generator), torch.randint(
        0, CLASSES, (BATCH,), generator=generator
    )


def full_network_gradients(model, x, y) -> list[torch.Tensor]:
    """Autograd on the plain network: B * dL/dh_i at every boundary (what backprop would send)."""
    activations, h = [], x
    for component in model.components[:-1]:
        h = component(h)
        activations.append(h)
    loss = F.cross_entropy(model.components[-1](h), y)
    return [g * BATCH for g in torch.autograd.grad(loss, activations)]


@pytest.mark.parametrize("name", ["dni", "cdni"])
def test_regression_target_is_the_true_gradient_at_the_boundary(tmp_path, name):
    # During warm-up every component passes the true gradient down: every target is backprop's.
    model = make_dni(
        tmp_path, "synth.warmup_steps=10", "staleness.schedule=constant", "staleness.k=0", name=name
    )
    x, y = batch()
    objective, _, _, boundaries = model.step_objective(x, y)
    objective.backward()
    for boundary, true in zip(boundaries, full_network_gradients(model, x, y)):
        torch.testing.assert_close(boundary.target, true, rtol=1e-5, atol=1e-7)


def test_regression_target_after_warmup_is_the_successors_gradient_pushed_back(tmp_path):
    model = make_dni(tmp_path, "staleness.schedule=constant", "staleness.k=0")
    x, y = batch()
    objective, _, _, boundaries = model.step_objective(x, y)
    objective.backward()
    # The last boundary's successor sees the real loss: its target is the full network's gradient.
    torch.testing.assert_close(boundaries[-1].target, full_network_gradients(model, x, y)[-1])
    # The one below: the successor's synthetic gradient pushed back through the successor.
    h = boundaries[0].activation.clone().requires_grad_()
    pushed = (model.components[1](h) * boundaries[1].prediction / BATCH).sum()
    (expected,) = torch.autograd.grad(pushed, h)
    torch.testing.assert_close(boundaries[0].target, expected * BATCH)


@pytest.mark.parametrize("delay", [0, 2])
def test_synthesizer_update_leaves_the_base_model_alone(tmp_path, delay):
    model = make_dni(
        tmp_path, "staleness.schedule=constant", f"staleness.k={delay}", "synth.scale=0.5"
    )
    for step in range(delay + 1):  # with a delay, the first targets arrive at step `delay`
        x, y = batch(step)
        model.zero_grad(set_to_none=True)
        objective, _, _, boundaries = model.step_objective(x, y)
        objective.backward()
        model.after_backward(boundaries, y)
        model.batch_step += 1
    # Each component's gradient is exactly its synthetic-gradient surrogate's (scaled), no more.
    h = x
    for i, boundary in enumerate(boundaries):
        out = model.components[i](h)
        params = list(model.components[i].parameters())
        expected = torch.autograd.grad((out * boundary.prediction / BATCH).sum(), params)
        for p, g in zip(params, expected):
            torch.testing.assert_close(p.grad, 0.5 * g)
        h = out.detach()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for s in model.synthesizers
        for p in s.net[-1].parameters()
    )
    # The synthesizers' optimizer step changes them and not a single base weight.
    before = [p.detach().clone() for p in model.components.parameters()]
    synth_before = [p.detach().clone() for p in model.synthesizers.parameters()]
    optimizers, _ = model.configure_optimizers()
    for optimizer in optimizers[len(model.components) :]:
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.components.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(synth_before, model.synthesizers.parameters()))


def test_delayed_targets_arrive_late_and_survive_a_checkpoint(tmp_path):
    model = make_dni(tmp_path, "staleness.schedule=constant", "staleness.k=2")
    targets = []
    for step in range(2):
        x, y = batch(step)
        objective, _, _, boundaries = model.step_objective(x, y)
        objective.backward()
        model.after_backward(boundaries, y)
        targets.append([b.target for b in boundaries])
        model.batch_step += 1
    state = model.topology_state_dict()
    restored = make_dni(tmp_path, "staleness.schedule=constant", "staleness.k=2")
    restored.load_topology_state_dict(state)
    due = restored.targets_in_flight.due(2)  # batch 0's targets, two steps late
    assert [key for key, _ in due] == [(0, 0), (0, 1)]
    for (_, boundary), item in due:
        torch.testing.assert_close(item["target"], targets[0][boundary])


class OracleDNI(DNI):
    """A perfect synthesizer: the true per-example gradient, by autograd through the successors."""

    def synthetic_gradient(self, index, h, y):
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            out = h
            for component in self.components[index + 1 :]:
                out = component(out)
            (grad,) = torch.autograd.grad(F.cross_entropy(out, y), h)
        return grad * h.shape[0]


def train_steps(model, cfg, tmp_path, steps: int):
    datamodule = create_datamodule(cfg.data, cfg.seed)
    trainer = build_trainer(cfg, tmp_path / model.name)
    trainer.fit(model, datamodule=datamodule)
    assert model.batch_step == steps
    return {k: v.detach() for k, v in model.components.state_dict().items()}


def test_oracle_synthesizer_makes_dni_equal_sync(tmp_path):
    steps = 4
    overrides = tiny_overrides(
        tmp_path,
        "model.num_components=3",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.test_after_fit=false",
        "simtime.enabled=false",
        "optim.name=sgd",
        "optim.lr=0.1",
    )
    # SGD, not Adam: Adam would hide a wrongly scaled gradient (its update is scale-invariant).
    sync_cfg = load_config(None, [*overrides, "topology.name=sync"])
    dni_cfg = load_config(None, [*overrides, "topology.name=dni"])
    torch.manual_seed(0)
    sync = create_topology(sync_cfg, INPUT_SHAPE, CLASSES)
    torch.manual_seed(0)
    oracle = OracleDNI(dni_cfg, INPUT_SHAPE, CLASSES)
    expected = train_steps(sync, sync_cfg, tmp_path, steps)
    got = train_steps(oracle, dni_cfg, tmp_path, steps)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(24,), (4, 6, 6)])
def test_synthesizer_starts_at_zero_and_keeps_the_shape(shape):
    synthesizer = GradientSynthesizer(shape, hidden=8, layers=2, num_classes=CLASSES)
    h, y = torch.randn(5, *shape), torch.randint(0, CLASSES, (5,))
    out = synthesizer(h, y)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


@pytest.mark.slow
def test_resume_with_targets_in_flight_is_exact(tiny_cfg, monkeypatch):
    at_cut = resumed_equals_uninterrupted(
        tiny_cfg,
        monkeypatch,
        "topology.name=cdni",
        "staleness.schedule=constant",
        "staleness.k=2",
        "model.width=64",
        "synth.hidden=32",
    )
    assert sorted(tuple(t["key"]) for t in at_cut["targets"]) == [
        (14, 0),
        (14, 1),
        (15, 0),
        (15, 1),
    ]


# ----- through `fit` (both families): resume after a preemption, plain DDP -----


DDP_FLAGS = (
    "model.num_components=3 staleness.schedule=constant trainer.strategy=ddp "
    "trainer.accelerator=cpu trainer.devices=2 trainer.max_steps=4 trainer.max_epochs=1 "
    "trainer.limit_val_batches=1 trainer.test_after_fit=false trainer.progress_bar=false "
    "logger.wandb.enabled=false"
).split()


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, delay", [("dni", 0), ("cdni", 1), ("mach_seq", 1), ("mach_kgraph", 1)]
)
def test_one_backward_per_step_runs_under_plain_ddp(tmp_path, name, delay):
    # Plain `ddp` (find_unused_parameters=False) stops on a parameter without a gradient.
    # dni with delay 0 regresses inside the backward (SyntheticBoundary), cdni with 1 outside it.
    flags = [f"topology.name={name}", f"staleness.k={delay}", *SMALL, *DDP_FLAGS]
    proc = fit_cli(*flags, f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
