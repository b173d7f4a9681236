"""Shared by the topology tests: cut a run mid-epoch, resume it, and compare with a whole run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mach_lightning import training
from mach_lightning.fit import run_fit


class Preempt(Callback):
    """Dies right after the batch at which a periodic checkpoint was saved (a killed job)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, *args):
        if module.batch_step == self.at_step:
            raise RuntimeError("preempted")


class FinalWeights(Callback):
    """The weights when training ends, every parameter and buffer, straight from the module."""

    def on_train_end(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def resumed_equals_uninterrupted(tiny_cfg, monkeypatch, *flags: str, cut: int = 16) -> dict:
    """2 digits epochs whole, and cut after `cut` steps then resumed: the same final weights
    (every parameter and buffer). Returns the topology state saved at the cut (its queues)."""
    flags = (
        "seed=5",
        "trainer.deterministic=true",
        "model.num_components=3",
        "trainer.test_after_fit=false",
        "trainer.limit_val_batches=2",
        "diagnostics.cosine_every_n_steps=3",
        f"run.checkpoint_every_n_steps={cut}",
        *flags,
    )
    build = training.build_callbacks

    def run(callback: Callback, *extra: str):
        monkeypatch.setattr(training, "build_callbacks", lambda *a: build(*a) + [callback])
        return run_fit(tiny_cfg(*flags, *extra))

    whole, resumed = FinalWeights(), FinalWeights()
    run_dir = Path(run(whole, "run.id=whole")["run_dir"])
    with pytest.raises(RuntimeError, match="preempted"):
        run(Preempt(cut), "run.id=cut")
    ckpt = run_dir.parent / "cut" / "checkpoints" / "last.ckpt"
    at_cut = torch.load(ckpt, weights_only=False)["topology_state"]
    assert run(resumed, "run.id=cut", "resume=true")["metrics"]["step"] == 22
    assert at_cut["batch_step"] == cut
    assert [k for k in whole.state if not torch.equal(whole.state[k], resumed.state[k])] == []
    return at_cut
