"""`delayed` (Decoupled Parallel Backprop): exact stale-gradient semantics, checked independently.

Most tests drive the topology with a real Lightning Trainer over a few in-memory batches and record
the weights at the start of every step and the gradient each optimizer step applied; an
independent plain-PyTorch computation then says what that gradient must be.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from mach_lightning.config import composed_schema, validate_semantics
from mach_lightning.sim import create_topology
from mach_lightning.sim.diagnostics import cosine

INPUT_SHAPE, CLASSES, BATCH, STEPS = (1, 8, 8), 10, 16, 8


def make_cfg(*overrides: str):
    base = [
        "model.width=32",
        "model.depth=2",
        "model.embedding_dim=16",
        "model.num_components=3",
        "optim.name=sgd",
        "optim.momentum=0.0",
        "optim.lr=0.1",
        "trainer.log_every_n_steps=1",
        "diagnostics.cosine_every_n_steps=0",
        "simtime.enabled=false",
        "seed=0",
    ]
    schema = OmegaConf.structured(composed_schema())  # with the delayed section
    cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(base + [*overrides]))
    validate_semantics(cfg)
    return cfg


def constant_delay_cfg(grad_mode: str, k: int):
    """`delayed` with every component k steps late."""
    return make_cfg(
        "topology.name=delayed",
        f"delayed.grad_mode={grad_mode}",
        "staleness.schedule=constant",
        f"staleness.k={k}",
    )


def make_batches(steps: int = STEPS, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, *INPUT_SHAPE, generator=gen),
            torch.randint(CLASSES, (BATCH,), generator=gen),
        )
        for _ in range(steps)
    ]


class Recorder(Callback):
    """Component weights at the start of each step; the gradient each optimizer step applied."""

    def __init__(self):
        self.weights: list[dict] = []
        self.applied: dict[tuple[int, int], list[torch.Tensor]] = {}

    def on_train_start(self, trainer, module):
        for index, optimizer in enumerate(trainer.optimizers):

            def step(*args, _opt=optimizer, _orig=optimizer.step, _i=index, **kwargs):
                params = [p for g in _opt.param_groups for p in g["params"]]
                self.applied[(module.batch_step, _i)] = [p.grad.clone() for p in params]
                return _orig(*args, **kwargs)

            optimizer.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights.append(copy.deepcopy(module.components.state_dict()))


def train(cfg, batches, recorder: Recorder | None = None):
    torch.manual_seed(cfg.seed)
    model = create_topology(cfg, INPUT_SHAPE, CLASSES)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder] if recorder else [],
    )
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return model, trainer


def reference_gradients(model, weights: dict, x, y) -> list[list[torch.Tensor]]:
    """Plain backprop of batch (x, y) through a copy of the components holding `weights`."""
    components = copy.deepcopy(model.components)
    components.load_state_dict(weights)
    h = x
    for component in components:
        h = component(h)
    loss = F.cross_entropy(h, y)
    return [
        list(torch.autograd.grad(loss, list(c.parameters()), retain_graph=True)) for c in components
    ]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_zero_delays_reproduce_sync_weights(grad_mode):
    batches = make_batches()
    flags = ("optim.name=adam", "optim.lr=0.01", "staleness.schedule=constant", "staleness.k=0")
    sync, _ = train(make_cfg(*flags, "topology.name=sync"), batches)
    delayed, _ = train(
        make_cfg(*flags, "topology.name=delayed", f"delayed.grad_mode={grad_mode}"), batches
    )
    for (name, expected), got in zip(
        sync.components.state_dict().items(), delayed.components.state_dict().values()
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_constant_delay_applies_the_gradient_of_batch_t_minus_k(grad_mode):
    k, batches, recorder = 2, make_batches(), Recorder()
    model, _ = train(
        constant_delay_cfg(grad_mode, k),
        batches,
        recorder,
    )
    assert sorted({t for t, _ in recorder.applied}) == list(range(k, STEPS))
    for t in range(k, STEPS):
        # stash: the weights that did batch t-k's forward; recompute: the weights of step t.
        weights = recorder.weights[t - k] if grad_mode == "stash" else recorder.weights[t]
        expected = reference_gradients(model, weights, *batches[t - k])
        for i in range(3):
            assert_same(recorder.applied[(t, i)], expected[i])


def test_pipeline_stash_applies_the_full_gradient_at_the_stashed_weights():
    batches, recorder = make_batches(), Recorder()
    model, _ = train(
        make_cfg("topology.name=delayed", "staleness.schedule=pipeline"), batches, recorder
    )
    for t in range(STEPS):
        for i, delay in enumerate([2, 1, 0]):
            s = t - delay
            if s < 0:
                assert (t, i) not in recorder.applied
                continue
            expected = reference_gradients(model, recorder.weights[s], *batches[s])[i]
            assert_same(recorder.applied[(t, i)], expected)


def test_pipeline_recompute_replays_the_old_input_at_the_current_weights():
    # K=2: component 1 is on time; component 0 applies batch t-1 one step late. Its input x_{t-1}
    # is replayed through its weights of step t; the gradient message comes from component 1's
    # backward of batch t-1 at step t-1, on the activation computed then.
    batches, recorder = make_batches(), Recorder()
    model, _ = train(
        make_cfg(
            "topology.name=delayed",
            "delayed.grad_mode=recompute",
            "model.num_components=2",
            "staleness.schedule=pipeline",
        ),
        batches,
        recorder,
    )
    first, second = copy.deepcopy(model.components[0]), copy.deepcopy(model.components[1])
    for t in range(1, STEPS):
        x, y = batches[t - 1]
        prefix = "0."
        first.load_state_dict(
            {k[2:]: v for k, v in recorder.weights[t - 1].items() if k.startswith(prefix)}
        )
        second.load_state_dict(
            {k[2:]: v for k, v in recorder.weights[t - 1].items() if k.startswith("1.")}
        )
        h_then = first(x).detach().requires_grad_(True)
        message = torch.autograd.grad(F.cross_entropy(second(h_then), y), h_then)[0]
        first.load_state_dict(
            {k[2:]: v for k, v in recorder.weights[t].items() if k.startswith(prefix)}
        )
        expected = torch.autograd.grad(first(x), list(first.parameters()), message)
        assert_same(recorder.applied[(t, 0)], list(expected))


def test_dcasgd_compensates_with_the_stashed_weights():
    k, lr, lam, batches, recorder = 2, 0.1, 0.5, make_batches(), Recorder()
    model, _ = train(
        make_cfg(
            "topology.name=delayed",
            "staleness.schedule=constant",
            f"staleness.k={k}",
            f"optim.lr={lr}",
            f"delayed.dcasgd_lambda={lam}",
        ),
        batches,
        recorder,
    )
    for t in range(k, STEPS - 1):
        grads = reference_gradients(model, recorder.weights[t - k], *batches[t - k])
        names = list(recorder.weights[t])
        flat = [g for component in grads for g in component]
        for name, g in zip(names, flat):
            now, then = recorder.weights[t][name], recorder.weights[t - k][name]
            expected = now - lr * (g + lam * g * g * (now - then))
            torch.testing.assert_close(
                recorder.weights[t + 1][name], expected, rtol=1e-5, atol=1e-6
            )


def test_random_schedule_runs_are_reproducible_from_the_seed():
    batches = make_batches(12)
    flags = ("topology.name=delayed", "staleness.schedule=uniform", "staleness.cap=3")
    runs = [train(make_cfg(*flags, f"staleness.seed={s}"), batches)[0] for s in (5, 5, 6)]
    a, b, c = (list(m.components.state_dict().values()) for m in runs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    histogram = runs[0].diagnostics.staleness.histograms
    assert sum(histogram[2].values()) > 0 and max(max(h) for h in histogram if h) <= 3


def test_diagnostics_report_the_applied_staleness_and_cosine():
    cfg = make_cfg(
        "topology.name=delayed",
        "staleness.schedule=pipeline",
        "diagnostics.cosine_every_n_steps=1",
        "simtime.enabled=true",
    )
    model, trainer = train(cfg, make_batches())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert [metrics[f"diag/staleness_c{i}"] for i in range(3)] == [2.0, 1.0, 0.0]
    assert metrics["diag/cos_c2"] == pytest.approx(1.0)  # no delay: the true gradient
    assert metrics["diag/cos_now_c2"] == pytest.approx(1.0)
    assert metrics["diag/cos_c0"] < 0.9999 and metrics["diag/inflight_mb"] > 0
    assert metrics["time/sim_step_ms"] > 0 and metrics["time/sim_elapsed_s"] > 0
    # batches are held only until their last update: what is left lands after the last step
    assert all(b["until"] >= STEPS for b in model.diagnostics.probe.batches.values())


def test_cosine_is_against_the_same_batch_at_the_current_weights():
    k, batches, recorder = 2, make_batches(), Recorder()
    flags = (
        "staleness.schedule=constant",
        f"staleness.k={k}",
        "diagnostics.cosine_every_n_steps=4",
    )
    model, trainer = train(make_cfg("topology.name=delayed", *flags), batches, recorder)
    t = STEPS - 1  # the last probe step
    same = reference_gradients(model, recorder.weights[t], *batches[t - k])
    now = reference_gradients(model, recorder.weights[t], *batches[t])
    for i in range(3):
        applied = recorder.applied[(t, i)]
        metric = trainer.callback_metrics
        assert float(metric[f"diag/cos_c{i}"]) == pytest.approx(cosine(applied, same[i]), abs=1e-6)
        assert float(metric[f"diag/cos_now_c{i}"]) == pytest.approx(
            cosine(applied, now[i]), abs=1e-6
        )
    _, trainer = train(make_cfg("topology.name=local", *flags), batches)
    assert {f"diag/cos_c{i}" for i in range(3)} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("grad_mode", ["stash", "recompute"])
def test_inflight_memory_grows_linearly_with_the_delay(grad_mode):
    held = {}
    for k in (1, 2, 4):
        model, _ = train(
            constant_delay_cfg(grad_mode, k),
            make_batches(),
        )
        assert all(len(node.stored) == k for node in model.driver.nodes)
        held[k] = model.inflight_bytes()
    assert held[2] == 2 * held[1] and held[4] == 4 * held[1]
    params = sum(p.numel() * 4 for p in model.parameters())
    if grad_mode == "stash":  # a weight copy per batch in flight, plus the saved activations
        assert held[1] > params
    else:  # only the batch's input
        assert held[1] == BATCH * 64 * 4 + BATCH * 8
