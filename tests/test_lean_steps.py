"""The lean backward/step path: taken only when Lightning's full path would pass straight through.

That it trains bit for bit like the full path is checked for every topology in test_topologies.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback, Trainer

from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.methods.sync import Sync
from mach_lightning.sim import create_topology
from mach_lightning.sim.lean_steps import lean_step_blockers

from .conftest import tiny_overrides


class StepListener(Callback):
    """A callback that needs Lightning's full path: it reads every optimizer step."""

    def __init__(self):
        self.steps, self.lean = 0, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lean.append(pl_module.lean_steps)


class BackwardWatcher(Sync):
    def on_before_backward(self, loss):
        pass


def _module(tmp_path, cls=Sync):
    cfg = load_config(None, tiny_overrides(tmp_path))
    return cls(cfg, (1, 8, 8), 10)


def _trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)


def test_a_plain_cpu_run_has_no_blockers(tmp_path):
    assert lean_step_blockers(_trainer(devices=1), _module(tmp_path), []) == []


@pytest.mark.parametrize(
    ("trainer_kwargs", "module_cls", "reason"),
    [
        ({"devices": 1, "precision": "bf16-mixed"}, Sync, "precision bf16-mixed"),
        ({"devices": 2, "strategy": "ddp"}, Sync, "strategy DDPStrategy"),
        ({"devices": 1, "callbacks": [StepListener()]}, Sync, "StepListener listens to"),
        ({"devices": 1}, BackwardWatcher, "BackwardWatcher overrides on_before_backward"),
    ],
)
def test_blockers_name_what_needs_the_full_path(trainer_kwargs, module_cls, reason, tmp_path):
    blockers = lean_step_blockers(_trainer(**trainer_kwargs), _module(tmp_path, module_cls), [])
    assert any(reason in b for b in blockers), blockers


def test_a_listening_callback_still_sees_every_optimizer_step(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(tmp_path, "model.num_components=2", "trainer.max_epochs=1"),
    )
    datamodule = create_datamodule(cfg.data, cfg.seed)
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, tmp_path / "run")
    listener = StepListener()
    trainer.callbacks.append(listener)
    trainer.fit(model, datamodule=datamodule)
    assert listener.lean == [False] * model.batch_step
    assert listener.steps == 2 * model.batch_step == trainer.global_step == 22
