"""Per-component diagnostics of stale updates: what staleness was applied, and how good it was.

  diag/staleness_c{i}      mean staleness (batch steps) of the gradients component i applied
                           since the last log point; the full histogram is kept in the
                           checkpointed topology state and logged at the end of training as
                           diag/staleness_hist_c{i}_d{d} (count of updates of staleness d)
  diag/cos_c{i}            every diagnostics.cosine_every_n_steps steps: cosine similarity between
                           the gradient component i applied at that step (after any delay
                           compensation, as handed to its optimizer) and the true synchronous
                           gradient at that moment *of the same batch*: full backprop, at the
                           current weights, of the batch(es) the update belongs to. This isolates
                           the error of the update (staleness, local or synthetic gradients) from
                           minibatch noise. Over the component's backbone parameters: auxiliary
                           heads, synthesizers and the like are not part of the synchronous model.
  diag/cos_now_c{i}        the same against the gradient sync backprop would apply now (the current
                           batch): includes the noise between two batches, so it is low near
                           convergence for any topology whose update is not for the current batch

The true gradient is computed with autograd.grad on the side: no .grad, BatchNorm statistic, random
number or DDP hook of the real step is touched. Under DDP the applied gradient is the all-reduced
one and the true gradient is the local batch's, so cosines read slightly low there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mach_lightning.core.weights import frozen_buffers


class StalenessTracker:
    """Histogram (cumulative, checkpointed) and window mean of the applied staleness."""

    def __init__(self, num_components: int):
        self.histograms = [Counter() for _ in range(num_components)]
        self._window = [[0.0, 0] for _ in range(num_components)]

    def record(self, component: int, staleness: int) -> None:
        self.histograms[component][int(staleness)] += 1
        self._window[component][0] += staleness
        self._window[component][1] += 1

    def window_metrics(self) -> dict[str, float]:
        """Mean staleness per component since the last call (components with updates only)."""
        out = {
            f"diag/staleness_c{i}": total / count
            for i, (total, count) in enumerate(self._window)
            if count
        }
        self._window = [[0.0, 0] for _ in self._window]
        return out

    def histogram_metrics(self) -> dict[str, float]:
        return {
            f"diag/staleness_hist_c{i}_d{d}": float(n)
            for i, hist in enumerate(self.histograms)
            for d, n in sorted(hist.items())
        }

    def state_dict(self) -> dict[str, Any]:
        return {"histograms": [dict(h) for h in self.histograms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for hist, saved in zip(self.histograms, state.get("histograms", [])):
            hist.clear()
            hist.update({int(d): int(n) for d, n in saved.items()})


def backbone_params(component: nn.Module) -> list[nn.Parameter]:
    """The parameters that the synchronous model has too (the block, not heads or extras)."""
    block = getattr(component, "block", component)
    return list(block.parameters())


def true_sync_gradients(
    components: nn.ModuleList, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Per component, the backprop gradient of the chain's loss on (x, y) at the current weights."""
    params = [backbone_params(c) for c in components]
    with torch.enable_grad(), frozen_buffers(components):
        h = x
        for component in components:
            h = component(h)
        loss = F.cross_entropy(h, y)
        flat = torch.autograd.grad(loss, [p for group in params for p in group], allow_unused=True)
    grads, start = [], 0
    for group in params:
        grads.append(
            [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(group, flat[start : start + len(group)])
            ]
        )
        start += len(group)
    return grads


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    va = torch.cat([t.reshape(-1) for t in a]).double()
    vb = torch.cat([t.reshape(-1) for t in b]).double()
    return float(F.cosine_similarity(va, vb, dim=0, eps=1e-30))


class GradientProbe:
    """Every N steps: true synchronous gradients at the current weights, then cosines.

    `measure` (after the step's updates are known, before any optimizer steps) computes the true
    gradient on the current batch and on every batch an update is applied for; it needs those
    batches' raw data, which `keep` holds from their forward until they are applied, only for
    batches applied at a probe step (diagnostic memory, not counted as in-flight memory).
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = int(every_n_steps)
        self.batches: dict[int, dict[str, Any]] = {}

    def is_due(self, step: int) -> bool:
        return self.every_n_steps > 0 and (step + 1) % self.every_n_steps == 0

    def keep(self, step: int, x, y, due_steps) -> None:
        """At batch `step`'s forward: hold it if one of its updates lands on a probe step."""
        later = [d for d in due_steps if d > step]
        if any(self.is_due(d) for d in later):
            self.batches[step] = {"x": x, "y": y, "until": max(later)}

    def forget(self, step: int) -> None:
        """At the end of `step`: drop batches with no update left to probe."""
        self.batches = {s: b for s, b in self.batches.items() if b["until"] > step}

    def measure(self, step: int, components, x, y, applied: dict[int, list[int]]) -> dict:
        """True gradients: 'now' (batch `step`) and 'same' (per component, its applied batches)."""
        data = {step: (x, y), **{s: (b["x"], b["y"]) for s, b in self.batches.items()}}
        grads = {step: true_sync_gradients(components, x, y)}
        same = {}
        for i, batches in applied.items():
            if not batches or any(s not in data for s in batches):
                continue  # a batch we do not hold (e.g. an async replay sample): no same-batch cos
            for s in batches:
                if s not in grads:
                    grads[s] = true_sync_gradients(components, *data[s])
            same[i] = [sum(parts) for parts in zip(*(grads[s][i] for s in batches))]
        return {"now": grads[step], "same": same}

    def compare(self, measured: dict, components, applied) -> dict[str, float]:
        """Call after the optimizer steps: p.grad holds what each component applied."""
        out = {}
        for i in sorted(applied):
            if i >= len(components):  # a node without a component (a DNI oracle's synthesizer)
                continue
            params = backbone_params(components[i])
            if any(p.grad is None for p in params):
                continue
            grads = [p.grad for p in params]
            out[f"diag/cos_now_c{i}"] = cosine(grads, measured["now"][i])
            if i in measured["same"]:
                out[f"diag/cos_c{i}"] = cosine(grads, measured["same"][i])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = {int(s): b for s, b in state.get("batches", {}).items()}


class Diagnostics:
    """Staleness histogram and gradient cosines of a run: the simulator records, logs and saves."""

    def __init__(self, cfg, probe: bool = True):
        self.staleness = StalenessTracker(cfg.model.num_components)
        self.probe = GradientProbe(cfg.diagnostics.cosine_every_n_steps if probe else 0)
        self.probe_metrics: dict[str, float] = {}

    def metrics(self, at_log_point: bool, inflight_bytes) -> dict[str, float]:
        metrics = {}
        if at_log_point:
            metrics.update(self.staleness.window_metrics())
            metrics["diag/inflight_mb"] = inflight_bytes() / 2**20
        metrics.update(self.probe_metrics)
        self.probe_metrics = {}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"staleness": self.staleness.state_dict(), "probe": self.probe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.staleness.load_state_dict(state.get("staleness", {}))
        self.probe.load_state_dict(state.get("probe", {}))


class StaleDiagnosticsMixin:  # TEMPORARY: for methods not yet ported to rules
    def init_diagnostics(self) -> None:
        self.staleness = StalenessTracker(self.cfg.model.num_components)
        self.probe = GradientProbe(self.cfg.diagnostics.cosine_every_n_steps)
        self.probe_metrics: dict[str, float] = {}

    def inflight_bytes(self) -> int:
        return 0

    def step_metrics(self, at_log_point: bool) -> dict[str, float]:
        metrics = super().step_metrics(at_log_point)
        if at_log_point:
            metrics.update(self.staleness.window_metrics())
            metrics["diag/inflight_mb"] = self.inflight_bytes() / 2**20
        metrics.update(self.probe_metrics)
        self.probe_metrics = {}
        return metrics

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(self.staleness.histogram_metrics(), step=self.batch_step)

    def topology_state_dict(self) -> dict[str, Any]:
        return {
            **super().topology_state_dict(),
            "staleness": self.staleness.state_dict(),
            "probe": self.probe.state_dict(),
        }

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        super().load_topology_state_dict(state)
        self.staleness.load_state_dict(state.get("staleness", {}))
        self.probe.load_state_dict(state.get("probe", {}))
