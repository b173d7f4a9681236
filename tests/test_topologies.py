"""Every registered topology, automatically: a few CPU steps, finite losses, every part learns."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from mach_lightning.config import load_config
from mach_lightning.core.rule import Rule
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.methods import TOPOLOGIES, list_topologies, register_topology
from mach_lightning.sim import create_topology

from .conftest import tiny_overrides

SMOKE_STEPS = 6  # enough for every component to receive a gradient under the default delays


def _smoke(name: str, tmp_path, *extra: str, callbacks=()):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            f"topology.name={name}",
            "model.num_components=3",
            f"trainer.max_steps={SMOKE_STEPS}",
            "trainer.log_every_n_steps=1",
            "trainer.max_epochs=1",
            *extra,
        ),
    )
    datamodule = create_datamodule(cfg.data, cfg.seed)
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.callbacks.extend(callbacks)
    trainer.fit(model, datamodule=datamodule)
    return model, before, trainer


class PathSpy(Callback):
    """Records whether each batch trained on the lean backward/step path."""

    def __init__(self):
        self.lean = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lean.append(pl_module.lean_steps)


@pytest.mark.parametrize("name", list_topologies())
def test_topology_trains_every_parameter(name, tmp_path):
    model, before, trainer = _smoke(name, tmp_path)
    assert model.batch_step == SMOKE_STEPS
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"{name} never updated: {unchanged}"
    assert len(model.component_optimizers()) >= model.cfg.model.num_components


@pytest.mark.parametrize("name", list_topologies())
def test_lean_steps_change_nothing_but_speed(name, tmp_path):
    """The lean path (direct backward and optimizer steps) trains bit for bit like Lightning's
    full path, and keeps Lightning's optimizer-step count, which checkpointing relies on."""
    runs = {}
    for lean in (True, False):
        seed_everything(0, verbose=False)
        spy = PathSpy()
        model, _, trainer = _smoke(
            name, tmp_path / str(lean), f"trainer.lean_steps={lean}", callbacks=[spy]
        )
        assert spy.lean == [lean] * SMOKE_STEPS
        runs[lean] = (dict(model.named_parameters()), trainer.global_step)
    (lean_params, lean_steps), (full_params, full_steps) = runs[True], runs[False]
    assert lean_steps == full_steps >= SMOKE_STEPS  # every optimizer step counted alike
    unequal = [k for k, p in lean_params.items() if not torch.equal(p, full_params[k])]
    assert not unequal, f"{name}: lean and full paths trained {unequal} differently"


@pytest.mark.parametrize("name", list_topologies())
def test_topology_is_registered_under_its_name(name):
    cls = TOPOLOGIES[name]
    assert issubclass(cls, Rule) and cls.name == name


def test_registry_refuses_nameless_and_duplicate_topologies():
    with pytest.raises(TypeError, match="name"):
        register_topology(type("Nameless", (Rule,), {}))
    with pytest.raises(ValueError, match="already taken"):
        register_topology(type("Imposter", (Rule,), {"name": "sync"}))
