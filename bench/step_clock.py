"""Shared by the benchmarks: time the training loop through `fit` after a warm-up."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback

WARMUP = 20  # batch steps left out of every timing (first-call allocations, caches)


class StepClock(Callback):
    """Wall time from the end of warm-up to the end of training, over every Lightning hook."""

    def __init__(self):
        self.start, self.end = 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.batch_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.end = time.perf_counter()
