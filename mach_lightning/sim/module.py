"""The LightningModule all topologies share: components, optimizers, step counter, metrics.

A topology subclasses `TopologyModule` and writes `training_step` with manual optimization; this
base class does the bookkeeping around it (batch-step counter, timing, metric logging, schedulers,
checkpointed topology state, the lean backward/step path) so the topology file shows its
mechanism and nothing else.

Metric names (the documented scheme, also in the README):
  train/loss, train/acc            mean over the last `trainer.log_every_n_steps` batch steps
  val/loss, val/acc, test/...      the full-model output on the split
  val/acc_c{i}, test/acc_c{i}      component i's own output, for topologies where it has one
  time/step_ms, time/samples_per_s wall-clock of training_step, same window as train/loss
  time/sim_step_ms, time/sim_elapsed_s  simulated parallel time (sim/simtime.py; `sim_layout`)
Every metric is logged against `step`, the topology's own batch-step counter (Lightning's
`global_step` counts every optimizer's steps, K per batch here).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mach_lightning.core.blocks import Component, build_optimizer, build_scheduler
from mach_lightning.nets import build_backbone
from mach_lightning.sim.lean_steps import DirectStep, lean_step_blockers
from mach_lightning.sim.meter import DivergenceWatch, TrainMeter
from mach_lightning.sim.rank_state import gather_from_ranks, state_of_rank
from mach_lightning.sim.simtime import SimClock, SimLayout, slowdowns_from_config

MAIN_HEAD = "main"


class TopologyModule(LightningModule):
    """Base for every topology: K components from the configured backbone, one optimizer each."""

    name: ClassVar[str] = ""
    # Lightning sets `_current_fx_name` around every hook it calls (some 30 times a batch), and
    # nn.Module.__setattr__ checks each value against Parameter, Module and Tensor first; these
    # attributes only ever hold plain values, so they skip the checks.
    _PLAIN_ATTRIBUTES: ClassVar[frozenset] = frozenset(
        {"_current_fx_name", "batch_step", "_step_started", "_batch_counted", "_batch_finished"}
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in TopologyModule._PLAIN_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning reads training_step's signature before every batch (does it take batch_idx?);
        # a precomputed __signature__ answers inspect in a third of the time.
        step = cls.__dict__.get("training_step")
        if step is not None and "__signature__" not in vars(step):
            step.__signature__ = inspect.signature(step)

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
        self.components = self.build_components()
        self.batch_step = 0
        self.sim_clock = SimClock(cfg.simtime, slowdowns_from_config(cfg))
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

    # ----- structure: subclasses override these to add heads, synthesizers, students -----
    def build_components(self) -> nn.ModuleList:
        blocks = build_backbone(self.cfg.model, self.input_shape, self.num_classes)
        return nn.ModuleList(Component(block, i) for i, block in enumerate(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for component in self.components:
            x = component(x)
        return x

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits to evaluate: the full model under MAIN_HEAD, plus 'c{i}' per component head."""
        return {MAIN_HEAD: self(x)}

    def eval_head_names(self) -> list[str]:
        return [MAIN_HEAD]

    def optimizer_groups(self) -> list[list[nn.Parameter]]:
        """One parameter list per optimizer; default: one per component."""
        return [list(c.parameters()) for c in self.components]

    def topology_state_dict(self) -> dict[str, Any]:
        """In-flight state saved in checkpoints (queues, counters); extend with super()."""
        return {
            "batch_step": self.batch_step,
            "sim_clock": self.sim_clock.state_dict(),
            "meter": self._meter.state_dict(),
            "divergence": self._watch.state_dict(),
        }

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_step = int(state.get("batch_step", 0))
        self.sim_clock.load_state_dict(state.get("sim_clock", {}))
        self._meter.load_state_dict(state.get("meter", {}))
        self._watch.load_state_dict(state.get("divergence", {}))

    @property
    def diverged(self) -> str:
        """Why training stopped as diverged ('' while it has not)."""
        return self._watch.diverged

    def sim_layout(self) -> SimLayout:
        """How components share a step in simulated parallel time; default: a backprop chain."""
        return SimLayout(parallel=False)

    def step_metrics(self, at_log_point: bool) -> dict[str, float]:
        """Extra metrics to log after this batch step (diagnostics); extend with super()."""
        return self.sim_clock.metrics() if at_log_point else {}

    def wrap_optimizer(self, optimizer, index: int):
        """Hook to wrap optimizer `index` (e.g. delay compensation) before schedulers attach."""
        return optimizer

    # ----- optimizers -----
    def configure_optimizers(self):
        optimizers = [
            self.wrap_optimizer(build_optimizer(group, self.cfg.optim), i)
            for i, group in enumerate(self.optimizer_groups())
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

    def on_train_end(self) -> None:
        self._train_optimizers, self.lean_steps = None, False

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
            self.sim_clock.measure(self.components, batch[0], self.batch_step)
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
        Callbacks, `result.json` and the progress bar read the trainer's metric dicts, which are
        filled directly too: `self.log` costs about 0.25 ms per key on the CPU.
        """
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.batch_step)
        self.trainer.callback_metrics.update({k: torch.as_tensor(v) for k, v in metrics.items()})
        if "train/loss" in metrics:
            self.trainer.progress_bar_metrics["loss"] = metrics["train/loss"]

    # ----- evaluation -----
    def _make_eval_metrics(self) -> nn.ModuleDict:
        metrics = {
            head: MulticlassAccuracy(self.num_classes, average="micro")
            for head in self.eval_head_names()
        }
        return nn.ModuleDict({**metrics, "loss": MeanMetric()})

    def _eval_step(self, split: str, batch) -> None:
        x, y = batch
        logits = self.eval_logits(x)
        metrics = self.eval_metrics[split]
        for head, head_logits in logits.items():
            metrics[head].update(head_logits, y)
        metrics["loss"].update(F.cross_entropy(logits[MAIN_HEAD], y), weight=y.shape[0])

    def _log_eval(self, split: str, label: str | None = None) -> None:
        metrics, label = self.eval_metrics[split], label or split
        values = {f"{label}/loss": metrics["loss"].compute()}
        for head in self.eval_head_names():
            suffix = "" if head == MAIN_HEAD else f"_{head}"
            values[f"{label}/acc{suffix}"] = metrics[head].compute()
        for metric in metrics.values():
            metric.reset()
        self.log_dict(
            {**values, "step": float(self.batch_step), "epoch": float(self.current_epoch)}
        )
        self.log(f"{label}_acc", values[f"{label}/acc"], prog_bar=True, logger=False)

    def validation_step(self, batch, batch_idx) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", label=self.test_label)

    # ----- checkpoints carry the in-flight state -----
    # Under DDP each rank holds its own in-flight state (its own batches' queues and meter):
    # every rank's goes into the checkpoint, and each rank resumes from its own.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.count_batch()  # saved from a callback's on_train_batch_end: the batch is trained
        state = self.topology_state_dict()
        checkpoint["topology_state"] = state
        if self.trainer.world_size > 1:
            checkpoint["topology_state_ranks"] = gather_from_ranks(state, self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("topology_state", {})
        ranks = checkpoint.get("topology_state_ranks")
        world = self.trainer.world_size  # loaded by a Trainer (fit, or test of the best)
        if ranks is not None or world > 1:
            state = state_of_rank(ranks, self.global_rank, world, state)
        self.load_topology_state_dict(state)
