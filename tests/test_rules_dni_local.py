"""The dni and local rules on their own: their nodes driven by `LockstepDriver`, no Trainer.

Tiny nets and batches, no optimizer step (the weights stay those of the start, so an autograd
reference on the plain components says what each node's gradient must be): what a DNI node
applies is the synthetic gradient handed to it, its true-gradient target comes back exactly d
steps later; a local node never sends a gradient, and trains on a delayed input exactly d steps
after that input went forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mach_lightning.config import ConfigError
from mach_lightning.core.messages import GRADIENT, TARGET
from mach_lightning.core.synth import synthesizer_loss
from mach_lightning.methods import rule_class
from mach_lightning.sim.driver import LockstepDriver

from .test_delayed import BATCH, INPUT_SHAPE, make_batches, make_cfg

CLASSES, STEPS = 10, 5


def make(name: str, *overrides: str):
    torch.manual_seed(0)
    cfg = make_cfg(f"topology.name={name}", "synth.hidden=24", *overrides)
    rule = rule_class(name)(cfg, INPUT_SHAPE, CLASSES)
    for synthesizer in getattr(rule, "synthesizers", []):  # not all zero: a learnt synthesizer
        torch.nn.init.normal_(synthesizer.net[-1].weight, std=0.1)
    return rule, LockstepDriver(rule, rule.nodes())


def run(rule, driver, batches, delays: list[int], active=None):
    """Yield (step, result) for one simulator step per batch: forward, one backward, follow-ups."""
    for t, (x, y) in enumerate(batches):
        for module in rule.modules().values():
            module.zero_grad(set_to_none=True)
        result = driver.forward(x, y, t, delays, active(t) if active else None)
        result.objective.backward()
        driver.after_backward(result, t)
        yield t, result


def inputs_of(rule, x) -> list[torch.Tensor]:
    """The input each component sees for x at the current weights."""
    out, h = [], x
    with torch.no_grad():
        for component in rule.components:
            out.append(h)
            h = component(h)
    return out


def true_targets(rule, x, y) -> list[torch.Tensor]:
    """Backprop's B * dL/dh_i at every boundary."""
    hs, h = [], x
    for component in rule.components[:-1]:
        h = component(h)
        hs.append(h)
    loss = F.cross_entropy(rule.components[-1](h), y)
    return [g * x.shape[0] for g in torch.autograd.grad(loss, hs)]


def assert_grads(params, expected) -> None:
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


# ----- dni / cdni -----


@pytest.mark.parametrize("name", ["dni", "cdni"])
def test_a_dni_node_applies_the_synthetic_gradient_handed_to_it(name):
    rule, driver = make(name, "synth.scale=0.5")
    handed = {}

    def synthetic_gradient(index, h, y):  # the hook an oracle replaces: a fixed guess here
        generator = torch.Generator().manual_seed(index)
        handed[index] = torch.randn(h.shape, generator=generator)
        return handed[index]

    rule.synthetic_gradient = synthetic_gradient
    batches = make_batches(1)
    x, y = batches[0]
    for _, result in run(rule, driver, batches, [0, 0, 0]):
        assert all(out.updates and out.applied == [0] for out in result.outboxes.values())
    for i, h in enumerate(inputs_of(rule, x)[:-1]):
        params = list(rule.components[i].parameters())
        out = rule.components[i](h)
        expected = torch.autograd.grad(out, params, grad_outputs=handed[i] / BATCH)
        assert_grads(params, [0.5 * g for g in expected])  # synth.scale
    last = list(rule.components[-1].parameters())
    h = inputs_of(rule, x)[-1]
    assert_grads(last, torch.autograd.grad(F.cross_entropy(rule.components[-1](h), y), last))


@pytest.mark.parametrize("delay", [1, 3])
def test_a_delayed_target_arrives_exactly_d_steps_later(delay):
    rule, driver = make("dni", "synth.warmup_steps=100")  # warm-up: targets are backprop's
    batches, arrived = make_batches(STEPS), []
    step = rule.node_step

    def spy(node, inbox):
        arrived.append((inbox.step, node.index, [m.batch for m in inbox.take(TARGET)]))
        return step(node, inbox)

    rule.node_step = spy
    for t, result in run(rule, driver, batches, [delay] * 3):
        for i in range(2):  # the synthesizers' targets and their ages (diag/staleness_c{i})
            assert result.outboxes[i].ages == ([delay] if t >= delay else [])
        if t == delay:  # batch 0's targets regressed on now, at the weights of the start
            x, y = batches[0]
            for i, (h, target) in enumerate(zip(inputs_of(rule, x)[1:], true_targets(rule, x, y))):
                params = list(rule.synthesizers[i].parameters())
                loss = synthesizer_loss(rule.synthesizers[i](h, y), target)
                assert_grads(params, torch.autograd.grad(loss, params))
    steps = range(STEPS)
    due = [(t, i, [t - delay] if t >= delay and i < 2 else []) for t in steps for i in range(3)]
    assert arrived == due  # each node's own targets only, each exactly once
    pending = driver.in_flight.pending()
    assert sorted((m.batch, m.receiver) for m in pending) == [
        (s, i) for s in range(STEPS - delay, STEPS) for i in range(2)
    ]


def test_dni_refuses_loss_scaling_at_construction():
    with pytest.raises(ConfigError, match="loss scaling"):
        make("cdni", "trainer.precision=16-mixed")


# ----- local -----


@pytest.mark.parametrize("async_buffer", [0, 2])
def test_a_local_node_never_sends_a_gradient(async_buffer):
    rule, driver = make("local", f"local.async_buffer={async_buffer}")
    for _, result in run(rule, driver, make_batches(STEPS), [2, 1, 0]):
        for out in result.outboxes.values():
            assert not out.returns and all(m.kind != GRADIENT for m in out.messages)
            assert all(not m.tensor.requires_grad for m in out.messages)  # no live link either
        assert not result.returns and len(driver.in_flight) == 0


def test_a_delayed_local_input_is_trained_on_exactly_d_steps_later():
    rule, driver = make("local")
    delays, batches = [2, 1, 0], make_batches(STEPS)
    for t, result in run(rule, driver, batches, delays):
        for i, d in enumerate(delays):
            out, component = result.outboxes[i], rule.components[i]
            assert out.applied == ([t - d] if t >= d else [])
            if t < d:
                assert all(p.grad is None or not p.grad.any() for p in component.parameters())
                continue
            x, y = batches[t - d]  # its input from when batch t - d went forward
            h = component(inputs_of(rule, x)[i])
            loss = F.cross_entropy(h if component.head is None else component.head(h), y)
            params = list(component.parameters())
            assert_grads(params, torch.autograd.grad(loss, params))
    assert [sorted(n.stored.records) for n in rule.nodes()] == [[3, 4], [4], []]


def test_async_local_nodes_follow_the_schedules_activity():
    rule, driver = make("local", "local.async_buffer=2")
    active = lambda t: [True, t % 2 == 1, True]  # noqa: E731  (node 1 works one step in two)
    worked = []
    for _, result in run(rule, driver, make_batches(STEPS), [0, 0, 0], active):
        worked.append([out.updates for out in result.outboxes.values()])
    # node 1 has a sample from step 1 on, node 2 from when node 1 first wrote (step 1, read at 2)
    assert worked == [[True, False, False], [True, True, False], [True, False, True]] + [
        [True, True, True],
        [True, False, True],
    ]
    assert rule.rates(active) == [1.0, 0.5, 1.0]
