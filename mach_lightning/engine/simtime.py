"""Simulated parallel time: the wall-clock a step would take with each component on its own device.

On the first training batch, each component's forward and backward are timed on that batch
(`simtime.measure_reps` repetitions after one warm-up; the minimum, the repetition least disturbed
by other processes, which is what a device of its own would see; run with autograd.grad on detached
copies, so no .grad, BatchNorm statistic or random number of the real run is touched). From these:

  f_i, b_i    forward and backward ms of component i (its auxiliary head included, if any),
              times its hardware slowdown s_i (the straggler schedule's factor, 1 otherwise)
  comm_i      one message across link i (after component i): latency + bytes_i / bandwidth,
              bytes_i = the size of component i's output for one batch

  chain (sync backprop, one device per component, each waiting for the others):
      step = sum_i (f_i + b_i) + sum_{i<K-1} messages * comm_i
  parallel (decoupled: every device works on its own batch at the same time):
      step = max_i rate_i * ((1 + extra_forwards) f_i + b_i) + max_{i<K-1} messages * comm_i

`messages` is 2 per link when both activations and gradients cross it (sync, delayed), 1 when only
activations do (local). `extra_forwards` counts recomputed forwards (grad_mode=recompute: 1).
`rate_i` is the fraction of steps component i works (a slowed component that runs 1 step in f,
f times slower, costs the others nothing: rate 1/f). Communication is not overlapped with compute,
which overstates the decoupled step slightly; compute is assumed to scale perfectly per device.

Logged: time/sim_step_ms (the modelled step) and time/sim_elapsed_s (their running sum), so
time-to-accuracy compares in simulated parallel time, not only in steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mach_lightning.engine.delay import frozen_buffers


@dataclass
class SimLayout:
    """How a topology's components share a step: see the module docstring."""

    parallel: bool = False
    messages_per_link: int = 2
    extra_forwards: float = 0.0
    rates: list[float] | None = None


class SimClock:
    """Measures per-component timings once, then advances simulated time step by step."""

    def __init__(self, simtime_cfg, slowdowns: list[float]):
        self.enabled = bool(simtime_cfg.enabled)
        self.reps = int(simtime_cfg.measure_reps)
        self.latency_ms = float(simtime_cfg.link_latency_us) / 1000.0
        self.bytes_per_ms = float(simtime_cfg.link_bandwidth_gbs) * 1e9 / 1000.0
        self.slowdowns = list(slowdowns)
        self.fwd_ms: list[float] = []
        self.bwd_ms: list[float] = []
        self.out_bytes: list[int] = []
        self.elapsed_ms, self.last_step_ms = 0.0, 0.0
        self._cached: tuple = (None, None, 0.0)  # (layout, fwd_ms list, its step_ms)

    @property
    def measured(self) -> bool:
        return bool(self.fwd_ms)

    def measure(self, components: nn.ModuleList, x: torch.Tensor) -> None:
        times: list[tuple[list, list]] = [([], []) for _ in components]
        self.out_bytes = []
        with frozen_buffers(components):
            for rep in range(self.reps + 1):
                h = x
                for i, component in enumerate(components):
                    fwd, bwd, h = _time_component(component, h, needs_input_grad=i > 0)
                    if rep > 0:  # the first repetition warms up caches and kernels
                        times[i][0].append(fwd)
                        times[i][1].append(bwd)
                    if rep == 0:
                        self.out_bytes.append(h.numel() * h.element_size())
        self.fwd_ms = [min(f) for f, _ in times]
        self.bwd_ms = [min(b) for _, b in times]

    def comm_ms(self, link: int) -> float:
        return self.latency_ms + self.out_bytes[link] / self.bytes_per_ms

    def step_ms(self, layout: SimLayout) -> float:
        k = len(self.fwd_ms)
        links = [layout.messages_per_link * self.comm_ms(i) for i in range(k - 1)]
        if not layout.parallel:
            compute = [(self.fwd_ms[i] + self.bwd_ms[i]) * self.slowdowns[i] for i in range(k)]
            return sum(compute) + sum(links)
        rates = layout.rates or [1.0] * k
        compute = [
            rates[i]
            * self.slowdowns[i]
            * ((1.0 + layout.extra_forwards) * self.fwd_ms[i] + self.bwd_ms[i])
            for i in range(k)
        ]
        return max(compute) + max(links, default=0.0)

    def tick(self, layout: SimLayout) -> None:
        if self.enabled and self.measured:
            layout_then, fwd_then, ms = self._cached
            if layout != layout_then or fwd_then is not self.fwd_ms:  # new layout or timings
                ms = self.step_ms(layout)
                self._cached = (layout, self.fwd_ms, ms)
            self.last_step_ms = ms
            self.elapsed_ms += ms

    def metrics(self) -> dict[str, float]:
        if not (self.enabled and self.measured):
            return {}
        return {"time/sim_step_ms": self.last_step_ms, "time/sim_elapsed_s": self.elapsed_ms / 1e3}

    def state_dict(self) -> dict[str, Any]:
        return {
            "fwd_ms": self.fwd_ms,
            "bwd_ms": self.bwd_ms,
            "out_bytes": self.out_bytes,
            "elapsed_ms": self.elapsed_ms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fwd_ms = list(state.get("fwd_ms", []))
        self.bwd_ms = list(state.get("bwd_ms", []))
        self.out_bytes = list(state.get("out_bytes", []))
        self.elapsed_ms = float(state.get("elapsed_ms", 0.0))


def _time_component(component: nn.Module, h: torch.Tensor, needs_input_grad: bool):
    """Forward and backward ms of one component (and its head) on input h; returns its output."""
    inp = h.detach().requires_grad_(needs_input_grad)
    _sync(inp)
    start = time.perf_counter()
    out = component(inp)
    head = getattr(component, "head", None)
    outputs = [out] if head is None else [out, head(out)]
    _sync(inp)
    middle = time.perf_counter()
    params = [p for p in component.parameters() if p.requires_grad]
    inputs = params + ([inp] if needs_input_grad else [])
    # autograd.grad, not backward: nothing accumulates into .grad and DDP's hooks stay quiet.
    torch.autograd.grad(sum(o.sum() for o in outputs), inputs, allow_unused=True)
    _sync(inp)
    end = time.perf_counter()
    return 1000.0 * (middle - start), 1000.0 * (end - middle), out.detach()


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def slowdowns_from_config(cfg) -> list[float]:
    """Hardware slowdown per component: the straggler schedule's, else 1 (shared by topologies)."""
    factors = [1.0] * cfg.model.num_components
    if cfg.staleness.schedule == "straggler":
        factors[cfg.staleness.straggler_component] = float(cfg.staleness.straggler_factor)
    return factors
