"""Simulated parallel time: the wall-clock a step would take with each component on its own device.

Each component's forward and backward cost on a training batch comes from one of two models
(`simtime.cost`; sim/simtime_measure.py does the measuring, without touching the run):

  measured  timed on this machine with torch.utils.benchmark, torch pinned to
            `simtime.measure_threads` threads (on one CPU thread, by its CPU time): the fastest
            of `simtime.measure_reps` short rounds, on the first batch, at EARLY_TIMINGS and
            every `simtime.remeasure_every_n_steps` batch steps; the estimate in use is
            the median of all measurements so far, so one taken while the machine was busy is
            outvoted
  flops     forward and backward FLOPs (FlopCounterMode) divided by `simtime.flops_per_s`,
            counted once: a deterministic function of the config, identical across runs and
            machines (matmuls and convolutions only; elementwise work counts nothing)

From these:

  f_i, b_i    forward and backward ms of component i (its auxiliary head included, if any),
              times its hardware slowdown s_i (the straggler schedule's factor, 1 otherwise)
  o_i         its optimizers' step ms (with `simtime.optimizer_step`, measured cost only: timed on
              copies of its parameters; else 0: the simulated times of earlier runs leave it out)
  comm_i      one message across link i (after component i): latency + bytes_i / bandwidth,
              bytes_i = the size of component i's output for one batch

  chain (sync backprop, one device per component, each waiting for the others):
      step = sum_i (f_i + b_i + o_i) + sum_{i<K-1} messages * comm_i
  parallel (decoupled: every device works on its own batch at the same time):
      step = max_i rate_i * ((1 + extra_forwards) f_i + b_i + o_i) + max_{i<K-1} messages * comm_i

`messages` is 2 per link when both activations and gradients cross it (sync, delayed), 1 when only
activations do (local). `extra_forwards` counts recomputed forwards (grad_mode=recompute: 1).
`rate_i` is the fraction of steps component i works (a slowed component that runs 1 step in f,
f times slower, costs the others nothing: rate 1/f). Communication is not overlapped with compute,
which overstates the decoupled step slightly; compute is assumed to scale perfectly per device.

Logged: time/sim_step_ms (the modelled step) and time/sim_elapsed_s (their running sum), so
time-to-accuracy compares in simulated parallel time, not only in steps.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mach_lightning.sim.simtime_measure import (
    Work,
    chain_work,
    count_flops,
    optimizer_step,
    side_effect_free,
    time_optimizer_steps,
    time_works,
)

# Timed runs also measure at these early steps: the estimate most of the first N steps add up
# is then already a median of three, spread past the start, when data-loader workers and
# other processes starting up can slow every call of one or two measurements by a third.
EARLY_TIMINGS = (0, 4, 16)


@dataclass
class SimLayout:
    """How a topology's components share a step: see the module docstring."""

    parallel: bool = False
    messages_per_link: int = 2
    extra_forwards: float = 0.0
    rates: list[float] | None = None


class SimClock:
    """Measures per-component costs when due, then advances simulated time step by step."""

    def __init__(self, simtime_cfg, slowdowns: list[float]):
        get = simtime_cfg.get  # .get: a checkpoint's saved config may predate the newer keys
        self.enabled = bool(get("enabled", True))
        self.cost = str(get("cost", "measured"))
        self.flops_per_s = float(get("flops_per_s", 5e10))
        self.every = int(get("remeasure_every_n_steps", 5000))
        self.reps = int(get("measure_reps", 20))
        self.threads = int(get("measure_threads", 1))
        # measured cost: each component's optimizer step too (FLOPs count none of it)
        self.times_optimizers = bool(get("optimizer_step", False)) and self.cost == "measured"
        self.latency_ms = float(get("link_latency_us", 10.0)) / 1000.0
        self.bytes_per_ms = float(get("link_bandwidth_gbs", 16.0)) * 1e9 / 1000.0
        self.slowdowns = list(slowdowns)
        self.samples: list[tuple[list[float], list[float]]] = []  # (fwd_ms, bwd_ms) per measurement
        self.fwd_ms: list[float] = []  # the estimate in use: medians over samples
        self.bwd_ms: list[float] = []
        self.opt_samples: list[list[float]] = []  # optimizer ms per component, per measurement
        self.opt_ms: list[float] = []  # their medians (empty: not timed)
        self.out_bytes: list[int] = []
        self.measured_at = -1  # batch step of the latest measurement
        self.elapsed_ms, self.last_step_ms = 0.0, 0.0
        self._cached: tuple = (None, None, 0.0)  # (layout, fwd_ms list, its step_ms)

    @property
    def measured(self) -> bool:
        return bool(self.fwd_ms)

    @property
    def basis(self) -> str:
        """What the costs are in: checkpointed, so a resume under another cost model re-measures."""
        return "measured" if self.cost == "measured" else f"flops@{self.flops_per_s:g}"

    def due(self, step: int) -> bool:
        """Whether to measure before batch step `step`: the first batch; when timed and
        re-measuring, also the EARLY_TIMINGS steps and every N-th."""
        if not self.enabled:
            return False
        if not self.measured:
            return True
        if self.cost != "measured" or self.every <= 0 or step == self.measured_at:
            return False  # counted FLOPs do not change
        return step in EARLY_TIMINGS or step % self.every == 0

    def measure(self, components: nn.ModuleList, x: torch.Tensor, step: int = 0) -> None:
        """Measure a backprop chain of components on batch input x."""
        self.measure_work(components, lambda: chain_work(components, x), x.device, step)

    def measure_work(
        self, module: nn.Module, build: Callable[[], list[Work]], device, step: int = 0
    ) -> None:
        """Measure the works build() describes (one per component); module: all they touch."""
        with side_effect_free(module, device):
            works = build()
            if self.cost == "flops":
                ms_per_flop = 1e3 / self.flops_per_s
                costs = [(f * ms_per_flop, b * ms_per_flop) for f, b in map(count_flops, works)]
            else:
                costs = time_works(works, device, self.reps, self.threads)
        self.out_bytes = [w.out_bytes for w in works]
        self.samples.append(([f for f, _ in costs], [b for _, b in costs]))
        self._combine()
        self.measured_at = step

    def measure_optimizers(
        self, module: nn.Module, groups: list[list[tuple]], device, step: int = 0
    ) -> None:
        """Time each component's optimizer steps: groups[i] holds component i's (parameters,
        optim config) pairs. Call after measure/measure_work, at the same step."""
        with side_effect_free(module, device):
            steps = [[optimizer_step(params, cfg) for params, cfg in group] for group in groups]
            self.opt_samples.append(time_optimizer_steps(steps, device, self.reps, self.threads))
        self._combine()

    def _combine(self) -> None:
        # Median per component over all measurements: robust to one taken under a load burst.
        self.fwd_ms = [statistics.median(c) for c in zip(*(f for f, _ in self.samples))]
        self.bwd_ms = [statistics.median(c) for c in zip(*(b for _, b in self.samples))]
        self.opt_ms = [statistics.median(c) for c in zip(*self.opt_samples)]

    def comm_ms(self, link: int) -> float:
        return self.latency_ms + self.out_bytes[link] / self.bytes_per_ms

    def step_ms(self, layout: SimLayout) -> float:
        k = len(self.fwd_ms)
        links = [layout.messages_per_link * self.comm_ms(i) for i in range(k - 1)]
        opt = self.opt_ms if len(self.opt_ms) == k else [0.0] * k
        if not layout.parallel:
            compute = [
                (self.fwd_ms[i] + self.bwd_ms[i] + opt[i]) * self.slowdowns[i] for i in range(k)
            ]
            return sum(compute) + sum(links)
        rates = layout.rates or [1.0] * k
        compute = [
            rates[i]
            * self.slowdowns[i]
            * ((1.0 + layout.extra_forwards) * self.fwd_ms[i] + self.bwd_ms[i] + opt[i])
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
            "basis": self.basis,
            "samples": [[list(f), list(b)] for f, b in self.samples],
            "measured_at": self.measured_at,
            "fwd_ms": self.fwd_ms,
            "bwd_ms": self.bwd_ms,
            "out_bytes": self.out_bytes,
            "elapsed_ms": self.elapsed_ms,
            "opt_samples": [list(o) for o in self.opt_samples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed_ms = float(state.get("elapsed_ms", 0.0))
        # A checkpoint from before re-measurement holds one first-batch timing, and no basis.
        samples = state.get("samples")
        if samples is None:
            fwd, bwd = state.get("fwd_ms", []), state.get("bwd_ms", [])
            samples = [[fwd, bwd]] if fwd else []
        if state.get("basis", "measured") != self.basis:  # another cost model: measure afresh
            samples = []
        self.samples = [(list(f), list(b)) for f, b in samples]
        self.out_bytes = list(state.get("out_bytes", [])) if self.samples else []
        self.measured_at = int(state.get("measured_at", 0)) if self.samples else -1
        self.opt_samples = [list(o) for o in state.get("opt_samples", [])] if self.samples else []
        if not self.times_optimizers:
            self.opt_samples = []
        self.fwd_ms, self.bwd_ms = [], []
        if self.samples:
            self._combine()


def slowdowns_from_config(cfg) -> list[float]:
    """Hardware slowdown per component: the straggler schedule's, else 1 (shared by topologies)."""
    factors = [1.0] * cfg.model.num_components
    if cfg.staleness.schedule == "straggler":
        factors[cfg.staleness.straggler_component] = float(cfg.staleness.straggler_factor)
    return factors
