"""`local` (Decoupled Greedy Learning), and both stale topologies through `fit`: resume, DDP."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mach_lightning.core.messages import GRADIENT

from .conftest import fit_cli
from .resume_check import resumed_equals_uninterrupted
from .test_delayed import (
    INPUT_SHAPE,
    STEPS,
    Recorder,
    make_batches,
    make_cfg,
    train,
)


def local_gradients(model, weights: dict, inputs: list, y, index: int) -> list[torch.Tensor]:
    """Component `index`'s gradient of its own loss, with `weights`, on `inputs[index]`."""
    component = copy.deepcopy(model.components[index])
    prefix = f"{index}."
    component.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    )
    out = component(inputs[index])
    loss = F.cross_entropy(out if component.head is None else component.head(out), y)
    return list(torch.autograd.grad(loss, list(component.parameters())))


def chain_inputs(model, weights: dict, x) -> list[torch.Tensor]:
    """The input each component sees for x, going forward with `weights`."""
    components = copy.deepcopy(model.components)
    components.load_state_dict(weights)
    inputs, h = [], x
    with torch.no_grad():
        for component in components:
            inputs.append(h)
            h = component(h)
    return inputs


def test_components_get_aux_heads_and_no_gradient_crosses_them():
    batches, recorder = make_batches(), Recorder()
    model, _ = train(
        make_cfg("topology.name=local", "staleness.schedule=constant", "staleness.k=0"),
        batches,
        recorder,
    )
    assert [c.head is not None for c in model.components] == [True, True, False]
    assert model.eval_head_names() == ["main", "c0", "c1"]
    for t in range(STEPS):
        x, y = batches[t]
        inputs = chain_inputs(model, recorder.weights[t], x)
        for i in range(3):
            expected = local_gradients(model, recorder.weights[t], inputs, y, i)
            for got, want in zip(recorder.applied[(t, i)], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_delayed_inputs_are_the_activations_of_batch_t_minus_k():
    k, batches, recorder = 2, make_batches(), Recorder()
    model, _ = train(
        make_cfg("topology.name=local", "staleness.schedule=constant", f"staleness.k={k}"),
        batches,
        recorder,
    )
    assert sorted({t for t, _ in recorder.applied}) == list(range(k, STEPS))
    for t in range(k, STEPS):
        x, y = batches[t - k]
        inputs = chain_inputs(model, recorder.weights[t - k], x)  # produced when t-k was fresh
        for i in range(3):
            expected = local_gradients(model, recorder.weights[t], inputs, y, i)  # current weights
            for got, want in zip(recorder.applied[(t, i)], expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_async_buffer_with_a_straggler_trains_on_stale_samples():
    flags = (
        "topology.name=local",
        "local.async_buffer=3",
        "staleness.schedule=straggler",
        "staleness.straggler_component=1",
        "staleness.straggler_factor=2",
        "diagnostics.cosine_every_n_steps=4",
        "simtime.enabled=true",
    )
    batches = make_batches(12)
    model, trainer = train(make_cfg(*flags), batches)
    hist = model.diagnostics.staleness.histograms
    assert dict(hist[0]) == {0: 12}  # component 0 reads the data, every step
    assert sum(hist[1].values()) == 6  # the straggler works one step in two
    assert min(hist[2]) >= 1 and sum(hist[2].values()) == 10  # buffer empty until step 2
    buffers = model.rule.buffers()
    assert sorted(buffers) == [1, 2] and all(0 < len(b) <= 3 for b in buffers.values())
    assert model.sim_layout().rates == [1.0, 0.5, 1.0]
    assert (
        "diag/cos_c0" in trainer.callback_metrics and "time/sim_step_ms" in trainer.callback_metrics
    )
    again, _ = train(make_cfg(*flags), batches)
    other, _ = train(make_cfg(*flags, "staleness.seed=9"), batches)
    weights = [list(m.components.state_dict().values()) for m in (model, again, other)]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))


def test_mlp_head_and_conv_features_pool_to_a_small_head():
    model, _ = train(
        make_cfg(
            "topology.name=local",
            "local.aux_head=mlp",
            "local.aux_hidden=7",
            "model.backbone=cnn",
            "model.channels=[4,8]",
            "staleness.schedule=constant",
            "staleness.k=0",
        ),
        make_batches(2),
    )
    head = model.components[0].head
    assert isinstance(head[0], torch.nn.AdaptiveAvgPool2d) and head[2].in_features == 4 * 2 * 2
    assert head[2].out_features == 7
    logits = model.eval_logits(torch.zeros(2, *INPUT_SHAPE))
    assert set(logits) == {"main", "c0", "c1"} and logits["c1"].shape == (2, 10)


# ----- through `fit`: resume after a preemption, and plain DDP -----


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_resume_mid_epoch_with_gradients_in_flight_is_exact(tiny_cfg, monkeypatch, grad_mode):
    at_cut = resumed_equals_uninterrupted(
        tiny_cfg,
        monkeypatch,
        "topology.name=delayed",
        f"delayed.grad_mode={grad_mode}",
        "staleness.schedule=pipeline",
    )
    driver = at_cut["driver"]
    stored = {node: sorted(records) for node, records in driver["stored"].items()}
    assert stored == {0: [14, 15], 1: [15], 2: []}  # the forwards whose gradient is still due
    gradients = [m for m in driver["in_flight"] if m["kind"] == GRADIENT]
    # in transit to the nodes applying them next step: batch 14's to node 0, 15's to node 1
    assert [(m["batch"], m["sender"], m["receiver"]) for m in gradients] == [(14, 1, 0), (15, 2, 1)]
    assert ("weights" in driver["stored"][0][14]) == (grad_mode == "stash")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        ("topology.name=delayed", "staleness.schedule=pipeline"),
        (
            "topology.name=local",
            "local.async_buffer=4",
            "staleness.schedule=straggler",
            "staleness.straggler_component=1",
            "staleness.straggler_factor=3",
        ),
    ],
    ids=["delayed-pipeline", "local-async-straggler"],
)
def test_one_backward_per_step_runs_under_plain_ddp(tmp_path, flags):
    # Plain `ddp` has find_unused_parameters=False: a second backward in a step, or a parameter
    # without a gradient (a component with nothing due), stops the run with a reducer error.
    proc = fit_cli(
        *flags,
        "model.num_components=3",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.test_after_fit=false",
        "trainer.progress_bar=false",
        "diagnostics.cosine_every_n_steps=2",
        "logger.wandb.enabled=false",
        f"run.root={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run directory" in proc.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ("staleness.schedule=pipeline",),
        (
            "local.async_buffer=4",
            "staleness.schedule=straggler",
            "staleness.straggler_factor=2.5",
        ),
    ],
    ids=["delayed-inputs", "async-buffer"],
)
def test_resume_mid_epoch_with_activations_in_flight_is_exact(tiny_cfg, monkeypatch, flags):
    at_cut = resumed_equals_uninterrupted(tiny_cfg, monkeypatch, "topology.name=local", *flags)
    driver = at_cut["driver"]
    inputs = sum(len(records) for records in driver["stored"].values())  # delayed inputs
    samples = sum(len(b["entries"]) for b in driver["rule"]["buffers"].values())  # async
    assert inputs + samples > 0
