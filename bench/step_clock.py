"""Shared by the benchmarks: time the training loop through `fit` after a warm-up."""

from __future__ import annotations

import time

WARMUP = 20  # batch steps left out of every timing (first-call allocations, caches)


def timed_run_overrides(steps: int, run_root: str) -> list[str]:
    """A fit run of exactly `steps` training steps on the CPU: no validation, test or W&B."""
    return [
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=100",
        "trainer.limit_val_batches=0",
        "trainer.test_after_fit=false",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "logger.wandb.enabled=false",
        f"run.root={run_root}",
    ]


class StepClock:
    """Wall time from the end of warm-up to the end of the last training step, over every
    Lightning hook in between (the checkpoint written when training ends is not a step's cost).

    It wraps the module's own batch hooks rather than joining as a callback: an extra callback
    would add Lightning's per-callback dispatch to the very time being measured.
    """

    def __init__(self, module):
        self.start, self.end = 0.0, 0.0
        start_hook, end_hook = module.on_train_batch_start, module.on_train_batch_end

        def on_train_batch_start(batch, batch_idx):
            if module.batch_step == WARMUP:
                self.start = time.perf_counter()
            return start_hook(batch, batch_idx)

        def on_train_batch_end(outputs, batch, batch_idx):
            end_hook(outputs, batch, batch_idx)
            self.end = time.perf_counter()

        # Instance attributes: Lightning looks hooks up on the module object.
        module.on_train_batch_start = on_train_batch_start
        module.on_train_batch_end = on_train_batch_end
