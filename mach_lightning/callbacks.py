"""The run's own callbacks: last.ckpt at the right moments; a progress bar redrawn by the clock."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mach_lightning import runs


class LastCheckpoint(Checkpoint):
    """Keep last.ckpt the run's latest state, saved where a resume continues exactly:

    - at each epoch's end, in `on_train_epoch_end`: a `Checkpoint`, so Lightning runs it after the
      module's own epoch-end hook (the learning-rate schedulers have stepped) and after
      ModelCheckpoint (listed before it), so the file holds this epoch's best-checkpoint tracking;
    - every N batch steps (every_n_steps > 0), except at an epoch's last batch, where the
      epoch-end save follows (a checkpoint taken there would resume past the epoch-end hooks);
    - when training ends (max_steps, a divergence stop) and on SIGTERM, before Lightning stops:
      at the batch's end, or, for a SIGTERM that lands after that check but before Lightning's
      own (a narrow window: Lightning saves its loggers between the two), in `on_exception`. The
      batch is complete there, which Lightning resumes as a checkpoint saved after it; at an
      epoch's last batch the epoch-end hooks have not run, so the previous save stands.

    Saved from every rank (a collective save, safe under DDP: every rank reaches the same hooks).
    The file is written atomically (atomic.AtomicCheckpointIO): a kill mid-save keeps the
    previous one. (ModelCheckpoint's own save_last only writes when a new best is saved.)
    """

    def __init__(self, path: Path, every_n_steps: int = 0):
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_step = -1
        self._csv: dict[str, int] = {}

    def save_last(self, trainer) -> None:
        step = trainer.lightning_module.batch_step
        if trainer.is_global_zero:  # metrics.csv holds every row up to the checkpoint ...
            for logger in trainer.loggers:
                logger.save()
            # ... and the checkpoint its row count, so a resume cuts it back exactly there
            self._csv = {"csv_rows": runs.csv_rows(self.path.parent.parent), "at_step": step}
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state
        self._saved_step = step

    def state_dict(self) -> dict:
        return dict(self._csv)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.finish_batch(outputs, batch)  # before the module's own on_train_batch_end
        if trainer.received_sigterm:  # Lightning stops right after this batch's hooks
            self.save_last(trainer)
            return
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if self.every_n_steps > 0 and pl_module.batch_step % self.every_n_steps == 0:
            if not last_of_epoch:
                self.save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save_last(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if self._saved_step != pl_module.batch_step and batches_done < trainer.num_training_batches:
            self.save_last(trainer)

    def on_train_end(self, trainer, pl_module):
        if self._saved_step != pl_module.batch_step:  # else the epoch-end save holds this state
            self.save_last(trainer)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn by the clock: at most every `interval_s` seconds during
    training (and at each epoch's last batch) instead of every N batches. Lightning's bar redraws
    twice per update, which at hundreds of small batches a second is a visible share of a step
    and more updates than anyone can read."""

    def __init__(self, interval_s: float = 0.25):
        super().__init__(refresh_rate=10)  # validation and test bars: every 10 batches
        self.interval_s, self._next_redraw = interval_s, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, now = self.train_progress_bar, time.monotonic()
        if now < self._next_redraw and batch_idx + 1 != bar.total:
            return
        self._next_redraw = now + self.interval_s
        bar.n = batch_idx + 1
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # one redraw, with the new count

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: meaningless here (the run id is shown)
        return metrics
