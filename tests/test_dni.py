"""Synthetic gradients (dni, cdni): regression targets, an untouched base model, oracle = sync.

The white-box tests drive the rule's nodes with the simulator's `LockstepDriver` directly: a
boundary's true gradient is observed where the rule puts it, in the TARGET message a node sends
itself (delay > 0), or in the synthesizer's gradient when it regresses inside the backward (0).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mach_lightning.config import load_config
from mach_lightning.core.blocks import build_optimizer
from mach_lightning.core.messages import GRADIENT, TARGET
from mach_lightning.core.synth import GradientSynthesizer, synthesizer_loss
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.methods import TOPOLOGIES
from mach_lightning.methods.dni import DNI
from mach_lightning.sim import create_topology
from mach_lightning.sim.driver import LockstepDriver

from .conftest import fit_cli, tiny_overrides
from .resume_check import resumed_equals_uninterrupted

INPUT_SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 16
# Small nets: the maths is the same at any size, and the tests stay fast.
SMALL = ("model.width=32", "model.embedding_dim=16", "synth.hidden=24", "mach.student_width=24")


def make_dni(tmp_path, *extra: str, name: str = "dni"):
    """The rule (3 components) and a driver running its nodes; synthesizers not all zero."""
    overrides = [f"topology.name={name}", "model.num_components=3", *SMALL, *extra]
    cfg = load_config(None, tiny_overrides(tmp_path, *overrides))
    torch.manual_seed(0)
    rule = TOPOLOGIES[name](cfg, INPUT_SHAPE, CLASSES)
    for synthesizer in rule.synthesizers:  # a learnt synthesizer: predictions are not all zero
        torch.nn.init.normal_(synthesizer.net[-1].weight, std=0.1)
    return rule, LockstepDriver(rule, rule.nodes())


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *INPUT_SHAPE, generator=generator), torch.randint(
        0, CLASSES, (BATCH,), generator=generator
    )


def run_step(rule, driver, step: int, delay: int):
    """One simulator step of every node on batch(step): forward, one backward, the follow-ups
    (no optimizer step: the weights stay those of the start)."""
    for module in rule.modules().values():
        module.zero_grad(set_to_none=True)
    x, y = batch(step)
    result = driver.forward(x, y, step, [delay] * len(rule.components))
    result.objective.backward()
    driver.after_backward(result, step)
    return result


def activations(rule, x) -> list[torch.Tensor]:
    """h_i after every component but the last, at the current weights."""
    out, h = [], x
    with torch.no_grad():
        for component in rule.components[:-1]:
            h = component(h)
            out.append(h)
    return out


def targets_in_flight(driver, batch_index: int) -> list[torch.Tensor]:
    """The per-example targets (B * dL/dh) of a batch on their way, by boundary."""
    pending = sorted(driver.in_flight.pending(), key=lambda m: m.receiver)
    messages = [m for m in pending if m.kind in (TARGET, GRADIENT) and m.batch == batch_index]
    # A live boundary (warm-up: the true gradient flows through it) sends its own synthesizer
    # the target; a decoupled one gets it back from its successor as a delayed link's gradient.
    # Either message holds dL/dh.
    routes = [(m.kind, m.sender, m.receiver) for m in messages]
    assert routes in ([(TARGET, 0, 0), (TARGET, 1, 1)], [(GRADIENT, 1, 0), (GRADIENT, 2, 1)])
    return [m.tensor * BATCH for m in messages]


def assert_regressed_on(rule, index: int, h, y, target) -> None:
    """Synthesizer `index`'s gradient is its regression's onto `target` (delay 0)."""
    synthesizer = copy.deepcopy(rule.synthesizers[index])
    loss = synthesizer_loss(synthesizer(h, y), target)
    expected = torch.autograd.grad(loss, list(synthesizer.parameters()))
    for p, g in zip(rule.synthesizers[index].parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def assert_targets(rule, driver, delay: int, expected: list[torch.Tensor]) -> None:
    x, y = batch(0)
    if delay > 0:
        for got, want in zip(targets_in_flight(driver, 0), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        return
    for i, (h, want) in enumerate(zip(activations(rule, x), expected, strict=True)):
        assert_regressed_on(rule, i, h, y, want)


def full_network_gradients(model, x, y) -> list[torch.Tensor]:
    """Autograd on the plain network: B * dL/dh_i at every boundary (what backprop would send)."""
    activations, h = [], x
    for component in model.components[:-1]:
        h = component(h)
        activations.append(h)
    loss = F.cross_entropy(model.components[-1](h), y)
    return [g * BATCH for g in torch.autograd.grad(loss, activations)]


@pytest.mark.parametrize("delay", [0, 1])
@pytest.mark.parametrize("name", ["dni", "cdni"])
def test_regression_target_is_the_true_gradient_at_the_boundary(tmp_path, name, delay):
    # During warm-up every component passes the true gradient down: every target is backprop's.
    rule, driver = make_dni(
        tmp_path,
        "synth.warmup_steps=10",
        "staleness.schedule=constant",
        f"staleness.k={delay}",
        name=name,
    )
    run_step(rule, driver, 0, delay)
    assert_targets(rule, driver, delay, full_network_gradients(rule, *batch(0)))


@pytest.mark.parametrize("delay", [0, 1])
def test_regression_target_after_warmup_is_the_successors_gradient_pushed_back(tmp_path, delay):
    rule, driver = make_dni(tmp_path, "staleness.schedule=constant", f"staleness.k={delay}")
    run_step(rule, driver, 0, delay)
    x, y = batch(0)
    h0, h1 = activations(rule, x)
    # The last boundary's successor sees the real loss: its target is the full network's gradient.
    last = full_network_gradients(rule, x, y)[-1]
    # The one below: the successor's synthetic gradient pushed back through the successor.
    h = h0.clone().requires_grad_()
    pushed = (rule.components[1](h) * rule.synthetic_gradient(1, h1, y).detach() / BATCH).sum()
    (expected,) = torch.autograd.grad(pushed, h)
    assert_targets(rule, driver, delay, [expected * BATCH, last])


@pytest.mark.parametrize("delay", [0, 2])
def test_synthesizer_update_leaves_the_base_model_alone(tmp_path, delay):
    rule, driver = make_dni(
        tmp_path, "staleness.schedule=constant", f"staleness.k={delay}", "synth.scale=0.5"
    )
    for step in range(delay + 1):  # with a delay, the first targets arrive at step `delay`
        run_step(rule, driver, step, delay)
    # Each component's gradient is exactly its synthetic-gradient surrogate's (scaled), no more.
    x, y = batch(delay)
    h = x
    for i in range(len(rule.synthesizers)):
        out = rule.components[i](h)
        prediction = rule.synthetic_gradient(i, out.detach(), y).detach()
        params = list(rule.components[i].parameters())
        expected = torch.autograd.grad((out * prediction / BATCH).sum(), params)
        for p, g in zip(params, expected):
            torch.testing.assert_close(p.grad, 0.5 * g)
        h = out.detach()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for s in rule.synthesizers
        for p in s.net[-1].parameters()
    )
    # Node i steps optimizers i and K + i; the synthesizers' step changes them and no base weight.
    k = len(rule.components)
    assert [n.optimizers for n in rule.nodes()] == [[0, k], [1, k + 1], [2]]
    before = [p.detach().clone() for p in rule.components.parameters()]
    synth_before = [p.detach().clone() for p in rule.synthesizers.parameters()]
    optimizers = [build_optimizer(params, optim) for params, optim in rule.optimizer_groups()]
    assert all(type(o) is torch.optim.Adam for o in optimizers[k:])  # synth.optimizer
    assert all(o.param_groups[0]["lr"] == rule.cfg.synth.lr for o in optimizers[k:])
    for optimizer in optimizers[k:]:
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, rule.components.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(synth_before, rule.synthesizers.parameters()))


def test_delayed_targets_arrive_late_and_survive_a_checkpoint(tmp_path):
    rule, driver = make_dni(tmp_path, "staleness.schedule=constant", "staleness.k=2")
    targets = []
    for step in range(2):
        run_step(rule, driver, step, 2)
        targets.append(targets_in_flight(driver, step))
    state = copy.deepcopy(driver.state_dict())
    restored_rule, restored = make_dni(tmp_path, "staleness.schedule=constant", "staleness.k=2")
    restored.load_state_dict(state)
    due = restored.in_flight.take_due(2)  # batch 0's targets, two steps late
    assert [(m.kind, m.batch, m.receiver) for m in due] == [(GRADIENT, 0, 0), (GRADIENT, 0, 1)]
    for message in due:
        torch.testing.assert_close(message.tensor * BATCH, targets[0][message.receiver])
    # what each synthesizer regresses from when its target comes: in the rule's checkpointed state
    assert set(restored_rule.awaiting) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    for (i, b), kept in restored_rule.awaiting.items():
        assert set(kept) == {"activation", "labels", "prediction"}
        torch.testing.assert_close(kept["activation"], rule.awaiting[(i, b)]["activation"])


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


def test_oracle_synthesizer_makes_dni_equal_sync(tmp_path, monkeypatch):
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
    monkeypatch.setitem(TOPOLOGIES, "dni", OracleDNI)  # the simulator builds the oracle rule
    torch.manual_seed(0)
    oracle = create_topology(dni_cfg, INPUT_SHAPE, CLASSES)
    assert isinstance(oracle.rule, OracleDNI)
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
    in_flight = at_cut["driver"]["in_flight"]
    expected = [(14, 0), (14, 1), (15, 0), (15, 1)]  # batch, boundary
    assert sorted((m["batch"], m["receiver"]) for m in in_flight if m["kind"] == GRADIENT) == (
        expected
    )
    awaiting = at_cut["driver"]["rule"]["awaiting"]  # their synthesizers' inputs, kept here
    assert sorted((b, i) for i, b in awaiting) == expected


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


@pytest.mark.parametrize(
    "extra",
    [("synth.scale=0.5",), ("synth.warmup_steps=2",), ("topology.name=cdni", "synth.scale=2")],
)
@pytest.mark.parametrize("delay", [0, 1, 2])
def test_synthesizers_on_their_own_nodes_compute_what_they_compute_in_their_components(
    tmp_path, delay, extra
):
    """runtime.synthesizer=oracle moves synthesizer b to node K + b, between components b and
    b + 1 (in dist, a process of its own): every gradient, of every component and synthesizer,
    is the one the synthesizer gives inside its component's node, at every delay, in warm-up,
    with synth.scale, and for cdni."""
    name = next((e.split("=")[1] for e in extra if e.startswith("topology.name")), "dni")
    rest = [e for e in extra if not e.startswith("topology.name")]
    inside, inside_driver = make_dni(tmp_path / "in", *rest, name=name)
    apart, apart_driver = make_dni(tmp_path / "apart", "runtime.synthesizer=oracle", *rest,
                                   name=name)  # fmt: skip
    assert [n.index for n in apart.nodes()] == [0, 3, 1, 4, 2]
    assert apart.links() == [(0, 3), (3, 1), (1, 4), (4, 2)]
    assert {apart.process_of(n.index) for n in apart.nodes()} == set(range(5))
    assert [apart.component_of(i) for i in (3, 4)] == [0, 1]
    assert all("synthesizer" not in n.modules for n in apart.nodes() if n.index < 3)
    for step in range(4):
        run_step(inside, inside_driver, step, delay)
        run_step(apart, apart_driver, step, delay)
        for (key, a), b in zip(inside.components.named_parameters(), apart.components.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=f"step {step}: components.{key}")
        for (key, a), b in zip(
            inside.synthesizers.named_parameters(), apart.synthesizers.parameters()
        ):
            torch.testing.assert_close(b.grad, a.grad, msg=f"step {step}: synthesizers.{key}")
    assert inside.awaiting.keys() == apart.awaiting.keys()
    assert len(apart.awaiting) == (2 * delay if delay else 0)


def test_oracle_synthesizers_are_refused_where_there_are_none(tmp_path):
    from mach_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"runtime.synthesizer=oracle .* topology.name=delayed"):
        load_config(None, tiny_overrides(tmp_path, "topology.name=delayed",
                                         "runtime.synthesizer=oracle"))  # fmt: skip
