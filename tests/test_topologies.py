"""Every registered topology, automatically: a few CPU steps, finite losses, every part learns."""

from __future__ import annotations

import math

import pytest
import torch

from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.topologies import (
    TOPOLOGIES,
    create_topology,
    list_topologies,
    register_topology,
)
from mach_lightning.topologies.base import TopologyModule

from .conftest import tiny_overrides

SMOKE_STEPS = 6  # enough for every component to receive a gradient under the default delays


def _smoke(name: str, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            f"topology.name={name}",
            "model.num_components=3",
            f"trainer.max_steps={SMOKE_STEPS}",
            "trainer.log_every_n_steps=1",
            "trainer.max_epochs=1",
        ),
    )
    datamodule = create_datamodule(cfg.data, cfg.seed)
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = build_trainer(cfg, tmp_path / "run")
    trainer.fit(model, datamodule=datamodule)
    return model, before, trainer


@pytest.mark.parametrize("name", list_topologies())
def test_topology_trains_every_parameter(name, tmp_path):
    model, before, trainer = _smoke(name, tmp_path)
    assert model.batch_step == SMOKE_STEPS
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"{name} never updated: {unchanged}"
    assert len(model.component_optimizers()) >= model.cfg.model.num_components


@pytest.mark.parametrize("name", list_topologies())
def test_topology_is_registered_under_its_name(name):
    cls = TOPOLOGIES[name]
    assert issubclass(cls, TopologyModule) and cls.name == name


def test_registry_refuses_nameless_and_duplicate_topologies():
    with pytest.raises(TypeError, match="name"):
        register_topology(type("Nameless", (TopologyModule,), {}))
    with pytest.raises(ValueError, match="already taken"):
        register_topology(type("Imposter", (TopologyModule,), {"name": "sync"}))
