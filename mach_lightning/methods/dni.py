"""Decoupled Neural Interfaces: synthetic gradients break the backward lock (Jaderberg et al. 2016).

`dni`: after every component but the last sits a synthesizer S_i (mach_lightning/core/synth.py) that
predicts the gradient at the component's output h_i. Component i updates at once with S_i(h_i)
instead of waiting for the true gradient. `cdni` is the same class with label-conditioned
synthesizers, S_i(h_i, y): a separate registered name, so configs and result tables say which.

The synthesizer learns by regression onto the *true gradient at its boundary*: the successor's own
(synthetic or, for the last component, loss) gradient pushed back through the successor. That
target is detached from the predictor, so training a synthesizer never changes the base model.

One backward per step: `SyntheticBoundary` is the identity on the forward pass; on the backward
pass it receives the true gradient arriving from the successor, records it (the regression target),
hands the component the synthetic gradient instead (or the true one during `synth.warmup_steps`),
and, when the target is not delayed, injects the regression gradient into the synthesizer. The
true gradient may arrive late: with delay d_i (staleness.schedule, boundary i reads component i's
delay) it waits in a DelayQueue with the activation and labels it belongs to, and the synthesizer
regresses on it d_i steps later as an ordinary loss term. Per-boundary diagnostics:
  synth/loss_b{i}  regression loss at boundary i;  synth/cos_b{i}  cosine between the synthetic and
  the true gradient of the same batch;  diag/staleness_c{i}  the age of synthesizer i's targets.
`synth.scale` multiplies the synthetic gradient a component applies to its weights (applied to the
component's .grad after the backward), not the estimate passed down to the synthesizer below.
The precision must not use loss scaling (16-mixed): gradients are read as values at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mach_lightning.config import ConfigError, register_choices
from mach_lightning.core.blocks import build_optimizer, build_scheduler
from mach_lightning.core.inflight import DelayQueue
from mach_lightning.core.synth import (
    GradientSynthesizer,
    boundary_shapes,
    synthesizer_loss,
    synthesizer_loss_grad,
)
from mach_lightning.methods import register_topology
from mach_lightning.sim.diagnostics import StaleDiagnosticsMixin
from mach_lightning.sim.module import TopologyModule
from mach_lightning.sim.simtime import SimLayout
from mach_lightning.sim.staleness import create_schedule

register_choices("synth.optimizer", lambda: ["adam", "adamw", "sgd"])


@dataclass
class Boundary:
    """What one boundary did on one step; `target` is filled in by the backward pass."""

    index: int
    activation: torch.Tensor  # h_i, detached
    prediction: torch.Tensor  # S_i(h_i): the synthetic per-example gradient
    use_true_gradient: bool  # warm-up: hand the component the true gradient
    regress_now: bool  # delay 0: the synthesizer regresses inside this backward pass
    target: torch.Tensor | None = field(default=None)  # B * true dL/dh_i


class SyntheticBoundary(torch.autograd.Function):
    """Identity forward; backward swaps the true gradient for the synthetic one (see module doc)."""

    @staticmethod
    def forward(ctx, h, prediction, boundary: Boundary):
        ctx.save_for_backward(prediction)
        ctx.boundary = boundary
        return h.view_as(h)

    @staticmethod
    def backward(ctx, true_grad):
        (prediction,) = ctx.saved_tensors
        boundary, batch = ctx.boundary, true_grad.shape[0]
        target = true_grad.detach() * batch  # the per-example gradient the synthesizer predicts
        boundary.target = target
        to_component = true_grad if boundary.use_true_gradient else prediction.detach() / batch
        to_synthesizer = None
        if boundary.regress_now and ctx.needs_input_grad[1]:
            to_synthesizer = synthesizer_loss_grad(prediction, target)
        return to_component, to_synthesizer, None


class WindowMeans:
    """Means of named scalars over the steps since the last log point (no host sync per step)."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        total = self.sums.setdefault(key, [0.0, 0])
        total[0], total[1] = total[0] + value.detach(), total[1] + 1

    def summary(self) -> dict[str, float]:
        out = {key: float(total) / count for key, (total, count) in self.sums.items()}
        self.sums = {}
        return out


@register_topology
class DNI(StaleDiagnosticsMixin, TopologyModule):
    """Synthetic gradients at every boundary; unconditioned synthesizers."""

    name = "dni"
    conditioned = False  # cdni: synthesizers see the labels too

    def __init__(self, cfg, input_shape: tuple, num_classes: int):
        super().__init__(cfg, input_shape, num_classes)
        if self.cfg.trainer.precision.startswith("16"):
            raise ConfigError(
                f"{self.name} reads gradients as values at each boundary, which "
                "loss scaling distorts; use trainer.precision=32-true or bf16-mixed."
            )
        self.schedule = create_schedule(cfg.staleness, len(self.components), cfg.seed)
        self.targets_in_flight = DelayQueue()
        self.synth_meter = WindowMeans()
        self.init_diagnostics()

    def build_components(self) -> nn.ModuleList:
        components = super().build_components()
        synth, classes = self.cfg.synth, self.num_classes if self.conditioned else 0
        # Built after the components, so a seed gives the components sync's initial weights.
        self.synthesizers = nn.ModuleList(
            GradientSynthesizer(shape, synth.hidden, synth.layers, classes)
            for shape in boundary_shapes(components, self.input_shape)
        )
        return components

    def optimizer_groups(self) -> list[list[nn.Parameter]]:
        return super().optimizer_groups() + [list(s.parameters()) for s in self.synthesizers]

    def configure_optimizers(self):
        # Components use optim.*; synthesizers their own optimizer at synth.lr: a regression
        # whose targets shrink as training goes on is best left to an adaptive optimizer.
        synth = self.cfg.synth
        synth_optim = OmegaConf.merge(self.cfg.optim, {"name": synth.optimizer, "lr": synth.lr})
        num_components = len(self.components)
        optimizers = [
            self.wrap_optimizer(
                build_optimizer(group, self.cfg.optim if i < num_components else synth_optim), i
            )
            for i, group in enumerate(self.optimizer_groups())
        ]
        schedulers = [
            build_scheduler(o, self.cfg.optim, self.cfg.trainer.max_epochs) for o in optimizers
        ]
        return optimizers, [s for s in schedulers if s is not None]

    def sim_layout(self) -> SimLayout:
        return SimLayout(parallel=True)  # activations up, true gradients (targets) down

    def in_warmup(self) -> bool:
        return self.batch_step < self.cfg.synth.warmup_steps

    def synthetic_gradient(self, index: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Synthesizer `index`'s per-example gradient for h (tests swap in an oracle here)."""
        return self.synthesizers[index](h, y)

    # ----- one step -----
    def step_objective(self, x: torch.Tensor, y: torch.Tensor):
        """The scalar whose one backward trains everything; also the logits, loss and boundaries."""
        delays = self.schedule.delays(self.batch_step)
        h, boundaries = x, []
        for i, component in enumerate(self.components[:-1]):
            h = component(h)
            prediction = self.synthetic_gradient(i, h.detach(), y)
            boundary = Boundary(
                i, h.detach(), prediction.detach(), self.in_warmup(), regress_now=delays[i] == 0
            )
            h = SyntheticBoundary.apply(h, prediction, boundary)
            boundaries.append(boundary)
        logits = self.components[-1](h)
        loss = F.cross_entropy(logits, y)
        regressing = {b.index for b in boundaries if b.regress_now}
        return loss + self.arrived_regressions(regressing), logits, loss, boundaries

    def arrived_regressions(self, regressing: set[int]) -> torch.Tensor | float:
        """Regression losses on the true gradients that arrive at this step (delay > 0).

        A synthesizer with nothing to learn from this step adds 0 * its parameters, so that plain
        DDP sees every parameter used (one all-reduce, no find_unused_parameters).
        """
        total = 0.0
        for key, item in self.targets_in_flight.due(self.batch_step):
            self.targets_in_flight.pop(key)
            index = key[1]
            prediction = self.synthetic_gradient(index, item["activation"], item["labels"])
            regression = synthesizer_loss(prediction, item["target"])
            self.synth_meter.add(f"synth/loss_b{index}", regression)
            self.staleness.record(index, self.batch_step - key[0])
            total = total + regression
            regressing.add(index)
        for i, synthesizer in enumerate(self.synthesizers):
            if i not in regressing:
                total = total + sum(0.0 * p.sum() for p in synthesizer.parameters())
        return total

    def after_backward(self, boundaries: list[Boundary], y: torch.Tensor) -> None:
        """Scale the synthetic updates, send delayed targets on their way, record diagnostics."""
        delays = self.schedule.delays(self.batch_step)
        for b in boundaries:
            if b.regress_now:
                self.synth_meter.add(
                    f"synth/loss_b{b.index}", synthesizer_loss(b.prediction, b.target)
                )
                self.staleness.record(b.index, 0)
            else:
                item = {"activation": b.activation, "labels": y, "target": b.target}
                self.targets_in_flight.push(
                    (self.batch_step, b.index), self.batch_step + delays[b.index], item
                )
            cos = F.cosine_similarity(b.prediction.flatten(), b.target.flatten(), dim=0, eps=1e-30)
            self.synth_meter.add(f"synth/cos_b{b.index}", cos)
            if self.cfg.synth.scale != 1.0 and not b.use_true_gradient:
                for p in self.components[b.index].parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.cfg.synth.scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.component_optimizers()
        step, measured = self.batch_step, None
        applied = {i: [step] for i in range(len(self.components))}  # all at once, this batch
        if self.probe.is_due(step):  # true gradients at the weights of this step
            measured = self.probe.measure(step, self.components, x, y, applied)
        objective, logits, loss, boundaries = self.step_objective(x, y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(objective)
        self.after_backward(boundaries, y)
        for optimizer in optimizers:
            optimizer.step()
        if measured is not None:
            self.probe_metrics = self.probe.compare(measured, self.components, applied)
        return {"loss": loss.detach(), "logits": logits.detach()}

    # ----- logging and checkpoints -----
    def step_metrics(self, at_log_point: bool) -> dict[str, float]:
        metrics = super().step_metrics(at_log_point)
        if at_log_point:
            metrics.update(self.synth_meter.summary())
        return metrics

    def inflight_bytes(self) -> int:
        return self.targets_in_flight.held_bytes()

    def topology_state_dict(self) -> dict[str, Any]:
        return {**super().topology_state_dict(), "targets": self.targets_in_flight.state_dict()}

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        super().load_topology_state_dict(state)
        self.targets_in_flight.load_state_dict(state.get("targets", []))


@register_topology
class CDNI(DNI):
    """cDNI: DNI with synthesizers conditioned on the labels (one-hot), S_i(h_i, y)."""

    name = "cdni"
    conditioned = True
