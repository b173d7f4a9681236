"""Evaluation of the simulator's module: accuracy per head and loss on val and test, logged once.

Heads are the rule's (`eval_head_names`): "main", the full model, plus "c{i}" for each component
with an output of its own (local heads, MACH components with their students).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mach_lightning.core.rule import MAIN_HEAD


class Evaluation:
    """validation_step / test_step and their epoch-end logging, for a LightningModule."""

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
            {**values, "step": float(self.batch_step), "epoch": float(self.logged_epoch())}
        )
        self.log(f"{label}_acc", values[f"{label}/acc"], prog_bar=True, logger=False)

    eval_epoch: int | None = None  # set by a runtime that validates epochs after the fact

    def logged_epoch(self) -> int:
        return self.current_epoch if self.eval_epoch is None else self.eval_epoch

    def validation_step(self, batch, batch_idx) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", label=self.test_label)
