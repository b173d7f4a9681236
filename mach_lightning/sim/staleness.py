"""Staleness schedules: how many batch steps late each component sees the world.

A schedule answers two questions for batch step t and component i:
  delays(t)[i]  the delay d_i in batch steps (what `delayed` applies, the activation age in `local`)
  active(t)[i]  whether component i does any work at step t (a slowed component skips steps)
Deterministic schedules give the same answer every step. Random ones draw from a generator seeded
by (staleness.seed, t): the same seed gives the same delays, and a resumed run draws exactly what
an uninterrupted one would, with no generator state to checkpoint.

Schedules are small classes in a registry like the topologies; `staleness.schedule` names one and
`describe()` is logged with each run.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from mach_lightning.config import register_choices
from mach_lightning.core.random import step_generator

SCHEDULES: dict[str, type[StalenessSchedule]] = {}


def register_schedule(cls: type) -> type:
    """Class decorator: make a StalenessSchedule subclass available under its `name`."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a class attribute `name` to be registered.")
    SCHEDULES[cls.name] = cls
    return cls


def list_schedules() -> list[str]:
    return sorted(SCHEDULES)


def create_schedule(staleness_cfg, num_components: int, run_seed: int = 0) -> StalenessSchedule:
    """The schedule named by staleness.schedule, for K components."""
    return SCHEDULES[staleness_cfg.schedule](staleness_cfg, num_components, run_seed)


class StalenessSchedule:
    """Base class: every component on time (delay 0, active every step)."""

    name: ClassVar[str] = ""

    def __init__(self, cfg, num_components: int, run_seed: int = 0):
        # A plain namespace: schedules read their settings every step, and each DictConfig
        # attribute read costs tens of microseconds.
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        self.cfg = SimpleNamespace(**cfg) if isinstance(cfg, dict) else cfg
        self.num_components = num_components
        self.seed = run_seed if self.cfg.seed is None else int(self.cfg.seed)

    def delays(self, step: int) -> list[int]:
        return [0] * self.num_components

    def active(self, step: int) -> list[bool]:
        return [True] * self.num_components

    def slowdowns(self) -> list[float]:
        """How many times slower than normal each component's hardware is (simulated time)."""
        return [1.0] * self.num_components

    def max_delay(self) -> int:
        """An upper bound of every delay this schedule gives (sizes the in-flight queues)."""
        return max(self.delays(0))

    def describe(self) -> str:
        return f"{self.name}: delays {self.delays(0)}"


@register_schedule
class ConstantSchedule(StalenessSchedule):
    """Every component k steps late: classic stale-gradient SGD."""

    name = "constant"

    def delays(self, step: int) -> list[int]:
        return [int(self.cfg.k)] * self.num_components


@register_schedule
class PipelineSchedule(StalenessSchedule):
    """d_i = K-1-i: the gradient needs one step per component to travel down (DDG, PipeDream)."""

    name = "pipeline"

    def delays(self, step: int) -> list[int]:
        return [self.num_components - 1 - i for i in range(self.num_components)]


@register_schedule
class ListSchedule(StalenessSchedule):
    """An explicit delay per component, staleness.delays."""

    name = "list"

    def delays(self, step: int) -> list[int]:
        return [int(d) for d in self.cfg.delays]


class RandomSchedule(StalenessSchedule):
    """Independent random delays per component and step, at most staleness.cap."""

    def generator(self, step: int) -> torch.Generator:
        return step_generator(self.seed, step)

    def max_delay(self) -> int:
        return int(self.cfg.cap)

    def describe(self) -> str:
        return f"{self.name}: random delays in [0, {self.cfg.cap}], seed {self.seed}"


@register_schedule
class UniformSchedule(RandomSchedule):
    """d uniform on {0, ..., cap}."""

    name = "uniform"

    def delays(self, step: int) -> list[int]:
        draws = torch.randint(
            0, self.cfg.cap + 1, (self.num_components,), generator=self.generator(step)
        )
        return draws.tolist()


@register_schedule
class GeometricSchedule(RandomSchedule):
    """P(d) = p (1-p)^d: mostly fresh with a tail of late arrivals, clipped at cap."""

    name = "geometric"

    def delays(self, step: int) -> list[int]:
        u = torch.rand(self.num_components, generator=self.generator(step), dtype=torch.float64)
        p = float(self.cfg.p)
        if p >= 1.0:
            return [0] * self.num_components
        # Inverse CDF: d = floor(log(1-u) / log(1-p)).
        draws = torch.floor(torch.log1p(-u) / math.log1p(-p)).clamp(max=self.cfg.cap)
        return [int(d) for d in draws.tolist()]


@register_schedule
class StragglerSchedule(StalenessSchedule):
    """One component `factor` times slower, the others on time.

    The slow component's results arrive ceil(factor)-1 steps late (its delay) and, where a topology
    lets components run at their own pace (local with async_buffer), it works on 1 step in factor.
    """

    name = "straggler"

    def delays(self, step: int) -> list[int]:
        delays = [0] * self.num_components
        delays[self.cfg.straggler_component] = math.ceil(self.cfg.straggler_factor) - 1
        return delays

    def active(self, step: int) -> list[bool]:
        factor = float(self.cfg.straggler_factor)
        # Active when the step crosses a multiple of `factor`: 1/factor of the steps, any factor.
        runs = math.floor((step + 1) / factor) > math.floor(step / factor)
        return [runs or i != self.cfg.straggler_component for i in range(self.num_components)]

    def slowdowns(self) -> list[float]:
        factors = [1.0] * self.num_components
        factors[self.cfg.straggler_component] = float(self.cfg.straggler_factor)
        return factors

    def describe(self) -> str:
        c, f = self.cfg.straggler_component, self.cfg.straggler_factor
        return f"straggler: component {c} is {f}x slower, delays {self.delays(0)}"


register_choices("staleness.schedule", list_schedules)
