"""The simulator's LightningModule: one module runs any method's rule, every node in one process.

It builds the rule's modules (their state_dict keys: `components.{i}...`, `synthesizers.{i}...`),
hands each batch to the driver (sim/step.py, sim/driver.py), and does the bookkeeping around it:
the batch-step counter, timing, metric logging, schedulers, the lean backward/step path, and the
in-flight state in checkpoints (sim/checkpointing.py). Evaluation: sim/evaluation.py.

Metric names (the documented scheme, also in the README):
  train/loss, train/acc            mean over the last `trainer.log_every_n_steps` batch steps
  val/loss, val/acc, test/...      the full-model output on the split
  val/acc_c{i}, test/acc_c{i}      component i's own output, for methods where it has one
  time/step_ms, time/samples_per_s wall-clock of training_step, same window as train/loss
  time/sim_step_ms, time/sim_elapsed_s  simulated parallel time (sim/simtime.py; `sim_layout`)
Every metric is logged against `step`, the module's own batch-step counter (Lightning's
`global_step` counts every optimizer's steps, K per batch here).
"""

from __future__ import annotations

import math
import time

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mach_lightning import internals
from mach_lightning.core.blocks import build_optimizer, build_scheduler
from mach_lightning.core.rule import MAIN_HEAD
from mach_lightning.methods import rule_class
from mach_lightning.sim.checkpointing import InFlightState
from mach_lightning.sim.diagnostics import Diagnostics
from mach_lightning.sim.driver import LockstepDriver
from mach_lightning.sim.evaluation import Evaluation
from mach_lightning.sim.lean_steps import DirectStep, lean_step_blockers
from mach_lightning.sim.meter import DivergenceWatch, TrainMeter
from mach_lightning.sim.simtime import SimClock, SimLayout, slowdowns_from_config
from mach_lightning.sim.staleness import create_schedule
from mach_lightning.sim.step import measure, train_step


class TopologyModule(Evaluation, InFlightState, LightningModule):
    """Base for every topology: K components from the configured backbone, one optimizer each."""

    def __init__(self, cfg: DictConfig | dict, input_shape: tuple, num_classes: int):
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.save_hyperparameters(
            {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "input_shape": list(input_shape),
                "num_classes": num_classes,
            }
        )
        self.automatic_optimization = False
        self.cfg, self.input_shape, self.num_classes = cfg, tuple(input_shape), num_classes
        self.rule = rule_class(cfg.topology.name)(cfg, self.input_shape, num_classes)
        for attribute, module in self.rule.modules().items():  # components, synthesizers, ...
            setattr(self, attribute, module)
        self.driver = LockstepDriver(self.rule, self.rule.nodes())
        self.schedule = create_schedule(cfg.staleness, len(self.components), cfg.seed)
        self.diagnostics = Diagnostics(cfg, self.rule.probe) if self.rule.diagnostics else None
        self.batch_step = 0
        self.sim_clock = SimClock(cfg.simtime, slowdowns_from_config(cfg))
        self._layout = SimLayout(
            parallel=self.rule.parallel,
            messages_per_link=self.rule.messages_per_link,
            extra_forwards=self.rule.extra_forwards,
            rates=self.rule.rates(self.schedule.active),
        )
        self.eval_metrics = nn.ModuleDict(
            {split: self._make_eval_metrics() for split in ("val", "test")}
        )
        self._meter, self._step_started = TrainMeter(), 0.0
        # Read every step: plain ints, not DictConfig lookups (each costs ~10 us in omegaconf).
        self._log_every = int(cfg.trainer.log_every_n_steps)
        self._max_steps = int(cfg.trainer.max_steps)
        self.test_label = "test"  # fit sets "test_best" while testing the best checkpoint
        self._batch_counted = True  # False between a batch's start and its count_batch()
        self._batch_finished = True  # False between a batch's start and its finish_batch()
        self._watch = DivergenceWatch(float(cfg.trainer.get("divergence_factor", 100.0)))
        self._train_optimizers: list | None = None  # set while fitting: see on_train_start
        self.lean_steps = False  # True while fitting on the lean path (sim/lean_steps.py)

    @property
    def name(self) -> str:
        return self.rule.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule.eval_logits(x)[MAIN_HEAD]

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits to evaluate: the full model under MAIN_HEAD, plus 'c{i}' per component head."""
        return self.rule.eval_logits(x)

    def eval_head_names(self) -> list[str]:
        return self.rule.eval_head_names()

    def standalone_model(self, i: int) -> nn.Module:
        """Component i as a model of x alone, for the methods that have one (MACH)."""
        return self.rule.standalone_model(i)

    def num_nodes(self) -> int:
        """How many components can be taken out on their own (MACH); see `standalone_model`."""
        return self.rule.num_nodes()

    def chain_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.rule.chain_logits(i, x)

    @property
    def diverged(self) -> str:
        """Why training stopped as diverged ('' while it has not)."""
        return self._watch.diverged

    def sim_layout(self) -> SimLayout:
        """How components share a step in simulated parallel time (the rule's facts)."""
        return self._layout

    def inflight_bytes(self) -> int:
        return self.driver.held_bytes()

    def step_metrics(self, at_log_point: bool) -> dict[str, float]:
        """Extra metrics to log after this batch step: simulated time, diagnostics, nodes'."""
        metrics = self.sim_clock.metrics() if at_log_point else {}
        if self.diagnostics is not None:
            metrics.update(self.diagnostics.metrics(at_log_point, self.inflight_bytes))
        if at_log_point:
            for node in self.driver.nodes:
                metrics.update(node.meter.summary())
        return metrics

    def training_step(self, batch, batch_idx):
        return train_step(self, batch[0], batch[1])

    # ----- optimizers -----
    def configure_optimizers(self):
        optimizers = [
            self.rule.wrap_optimizer(build_optimizer(params, optim), i)
            for i, (params, optim) in enumerate(self.rule.optimizer_groups())
        ]
        schedulers = [
            build_scheduler(o, self.cfg.optim, self.cfg.trainer.max_epochs) for o in optimizers
        ]
        return optimizers, [s for s in schedulers if s is not None]

    def component_optimizers(self) -> list:
        """The optimizers as a list, also when there is one (Lightning unwraps a single one)."""
        if self._train_optimizers is not None:
            return self._train_optimizers
        return self._lightning_optimizers()

    def _lightning_optimizers(self) -> list:
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def on_train_start(self) -> None:
        """Choose the backward/step path once per fit (sim/lean_steps.py says why). Training
        metrics are logged at least once an epoch, also when an epoch is shorter than
        trainer.log_every_n_steps (digits has 11 batches: no loss shown for two epochs)."""
        batches = self.trainer.num_training_batches
        if math.isfinite(batches) and batches >= 1:
            self._log_every = max(1, min(int(self.cfg.trainer.log_every_n_steps), int(batches)))
        optimizers = self._lightning_optimizers()
        wanted = bool(self.cfg.trainer.get("lean_steps", True))
        blockers = lean_step_blockers(self.trainer, self, optimizers) if wanted else []
        if blockers:
            rank_zero_info(
                "lean_steps: Lightning's full backward/step path, since " + "; ".join(blockers)
            )
        self.lean_steps = wanted and not blockers
        self._train_optimizers = [DirectStep(o) for o in optimizers] if self.lean_steps else None

    def on_fit_start(self) -> None:
        if self.diagnostics is not None:  # config.yaml has the settings; this says what they mean
            rank_zero_info(f"{self.name}: staleness schedule {self.schedule.describe()}")

    def on_train_end(self) -> None:
        self._train_optimizers, self.lean_steps = None, False
        # The staleness histogram is logged once, straight to the loggers (no self.log here).
        if self.diagnostics is not None and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(self.diagnostics.staleness.histogram_metrics(), self.batch_step)

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.lean_steps:
            loss.backward(*args, **kwargs)  # what Lightning's full path runs, minus pass-throughs
        else:
            super().manual_backward(loss, *args, **kwargs)

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    # ----- bookkeeping around each training step -----
    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.sim_clock.due(self.batch_step):  # side-effect free; see sim/simtime.py
            measure(self.sim_clock, self, batch[0], self.batch_step)
        self._step_started = time.perf_counter()
        self._batch_counted = self._batch_finished = False

    def count_batch(self) -> None:
        """Count the batch just trained (once), e.g. for a checkpoint saved before finish_batch."""
        if not self._batch_counted:
            self._batch_counted = True
            self.batch_step += 1
            self.sim_clock.tick(self.sim_layout())

    def finish_batch(self, outputs, batch) -> None:
        """The bookkeeping of the batch just trained, once: count, meter, metrics, stop checks.
        Callbacks' on_train_batch_end runs before this module's, so one that saves a checkpoint
        calls this first: the checkpoint then holds this batch's meter window and its row."""
        if self._batch_finished:
            return
        self._batch_finished = True
        elapsed = time.perf_counter() - self._step_started
        self.count_batch()
        self._meter.update(outputs["loss"], outputs.get("logits"), batch[1], elapsed)
        if self._watch.first is None:  # the loss before any update: one host sync, once
            self._watch.first = float(outputs["loss"])
        at_log_point = self.batch_step % self._log_every == 0
        metrics = self.step_metrics(at_log_point)
        if at_log_point:
            metrics = {**self._meter.summary(), **metrics}
            self._meter.reset()
            self._watch.check(metrics["train/loss"], self.batch_step)
        if metrics:
            self.log_step_metrics(metrics)
        if self._watch.diverged or 0 < self._max_steps <= self.batch_step:
            self.trainer.should_stop = True

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.finish_batch(outputs, batch)

    def log_step_metrics(self, metrics: dict[str, float]) -> None:
        """Log a dict of floats against the topology's batch step (for extra diagnostics too).

        Straight to the loggers (rank zero only): values given to `self.log` stay in Lightning's
        results and are re-sent at every later step, repeating rows and costing time per step.
        Callbacks, `result.json` and the progress bar read the trainer's metric dicts: filled
        directly (internals.DIRECT_METRICS says what that buys), else through `self.log`.
        """
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.batch_step)
        if internals.DIRECT_METRICS:
            values = {k: torch.as_tensor(v) for k, v in metrics.items()}
            self.trainer.callback_metrics.update(values)
            if "train/loss" in metrics:
                self.trainer.progress_bar_metrics["loss"] = metrics["train/loss"]
            return
        self.log_dict(metrics, logger=False, on_step=True, on_epoch=False)
        if "train/loss" in metrics:
            self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, on_epoch=False)


def create_topology(cfg, input_shape: tuple, num_classes: int) -> LightningModule:
    """The simulator running the method cfg.topology.name, for data of this shape and classes."""
    cls = rule_class(cfg.topology.name)
    if issubclass(cls, LightningModule):  # TEMPORARY: a method not yet ported to a rule
        return cls(cfg, tuple(input_shape), num_classes)
    return TopologyModule(cfg, tuple(input_shape), num_classes)
