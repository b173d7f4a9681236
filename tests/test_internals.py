"""The private Lightning internals still in use (mach_lightning/internals.py) hold in the installed
Lightning: each one's attributes exist as expected, and its switch turned off trains to the same
results. A failure names the Lightning version and the switch to turn off: an upgrade within
pyproject.toml's bounds (lightning>=2.6,<3) may change any private attribute.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import lightning
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.core.optimizer import LightningOptimizer

from mach_lightning import internals
from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.sim import create_topology
from mach_lightning.sim.lean_steps import DirectStep
from mach_lightning.training import build_trainer

from .conftest import tiny_overrides

# Metrics from measured times (time/step_ms, the simulated time/sim_*) differ from run to run;
# only their names must agree.
TIMED = "time/"


def broken(switch: str, what: str) -> str:
    return (
        f"Lightning {lightning.__version__}: {what}. mach_lightning/internals.py relies on it; "
        f"run with {internals.ENV}={switch} (the public path: same results, slower) until the "
        "code is adapted."
    )


class PathSpy(Callback):
    """Records each batch's path, without listening to a step hook (that would block it)."""

    def __init__(self):
        self.lean, self.direct = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lean.append(pl_module.lean_steps)
        self.direct.append(all(o.direct for o in pl_module.component_optimizers()))


def tiny_fit(tmp_path, **switches):
    """A two-component sync run on digits with the given switches; (model, trainer, spy)."""
    cfg = load_config(None, tiny_overrides(tmp_path, "model.num_components=2"))
    datamodule = create_datamodule(cfg.data, cfg.seed)
    seed_everything(cfg.seed, verbose=False)
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, tmp_path / "run")
    spy = PathSpy()
    trainer.callbacks.append(spy)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in switches.items():
            patch.setattr(internals, name, value)
        trainer.fit(model, datamodule=datamodule)
    return model, trainer, spy


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run with every internal on."""
    return tiny_fit(tmp_path_factory.mktemp("on"))


def metrics_of(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith(TIMED)}


def test_the_environment_turns_switches_off():
    assert internals.switched_off("") == frozenset()
    assert internals.switched_off("all") == frozenset(internals.SWITCHES)
    assert internals.switched_off(" Direct_Metrics,") == {"direct_metrics"}
    with pytest.raises(ValueError, match="no switch named lean_steps_count; the switches are"):
        internals.switched_off("lean_steps_count")
    env = {**os.environ, internals.ENV: "lean_step_count"}
    code = "from mach_lightning import internals as i; print(i.DIRECT_METRICS, i.LEAN_STEP_COUNT)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"], out.stderr


# ----- DIRECT_METRICS: trainer.callback_metrics / progress_bar_metrics written directly -----
def test_the_trainer_metric_dicts_take_direct_writes(reference):
    _, trainer, _ = reference
    for name in ("callback_metrics", "progress_bar_metrics"):
        first, second = getattr(trainer, name), getattr(trainer, name)
        assert isinstance(first, dict) and first is second, broken(
            "direct_metrics", f"trainer.{name} no longer returns the logger connector's own dict"
        )
    assert "train/loss" in trainer.callback_metrics, broken(
        "direct_metrics", "training metrics written into trainer.callback_metrics did not stay"
    )
    assert "loss" in trainer.progress_bar_metrics, broken(
        "direct_metrics", "the loss written into trainer.progress_bar_metrics did not stay"
    )


def test_direct_metrics_off_gives_the_same_metrics(reference, tmp_path):
    _, on, _ = reference
    _, off, _ = tiny_fit(tmp_path, DIRECT_METRICS=False)
    # self.log puts the progress bar's "loss" (train/loss again) among the callback metrics too
    assert set(off.callback_metrics) - {"loss"} == set(on.callback_metrics)
    off_metrics = {k: v for k, v in metrics_of(off).items() if k != "loss"}
    assert off_metrics == pytest.approx(metrics_of(on), rel=1e-6)
    assert float(off.progress_bar_metrics["loss"]) == pytest.approx(
        float(on.progress_bar_metrics["loss"]), rel=1e-6
    )


# ----- LEAN_STEP_COUNT: LightningOptimizer._on_before_step / _on_after_step -----
def test_lightning_optimizer_has_the_step_callbacks():
    optimizer = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    for name in ("_on_before_step", "_on_after_step"):
        hook = getattr(optimizer, name, None)
        assert callable(hook), broken("lean_step_count", f"LightningOptimizer has no {name}")
        assert not inspect.signature(hook).parameters, broken(
            "lean_step_count", f"LightningOptimizer.{name} now takes arguments"
        )


def test_direct_steps_keep_lightning_step_count(reference):
    model, trainer, spy = reference
    assert spy.lean == spy.direct == [True] * model.batch_step, "the run left the lean path"
    assert trainer.global_step == 2 * model.batch_step, broken(
        "lean_step_count",
        f"optimizer steps taken between _on_before_step and _on_after_step are no longer "
        f"counted (global_step {trainer.global_step}, {2 * model.batch_step} steps taken)",
    )


def test_lean_step_count_off_trains_the_same(reference, tmp_path):
    model_on, on, _ = reference
    model_off, off, spy = tiny_fit(tmp_path, LEAN_STEP_COUNT=False)
    assert spy.lean == [True] * model_off.batch_step and not any(spy.direct)
    assert off.global_step == on.global_step
    params = dict(model_on.named_parameters())
    unequal = [k for k, p in model_off.named_parameters() if not torch.equal(p, params[k])]
    assert not unequal, f"the public step path trained {unequal} differently"


def test_a_direct_step_without_the_callbacks_takes_the_public_step():
    class Bare:  # a LightningOptimizer that lost the two callbacks
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)

        def step(self, closure=None):
            self.stepped = True

    bare = Bare()
    DirectStep(bare).step()
    assert bare.stepped
