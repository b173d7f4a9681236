"""Lean steps: backward and optimizer steps without Lightning's per-call indirections, when safe.

Under manual optimization Lightning sends every `manual_backward` and every optimizer `step()`
through its strategy and precision plugin, and fires a round of callback and module hooks around
each (on_before_backward, on_after_backward, on_before_optimizer_step). At full precision on one
device the strategy and plugin pass the call through unchanged, and when nothing overrides those
hooks the round does nothing, yet on a small model it all costs several percent of a step, more
with K optimizers (bench/overhead.py). When all of that holds, `TopologyModule` calls
`loss.backward()` and steps the torch optimizers itself. The maths is identical, and Lightning's
optimizer-step count (`trainer.global_step`, which checkpointing relies on) is still kept: a
`DirectStep` calls the same two callbacks Lightning's manual loop installs around each step
(private: internals.LEAN_STEP_COUNT; switched off, it calls the public `LightningOptimizer.step`).

`trainer.lean_steps=false` turns this off; `lean_step_blockers` says why a run does not take it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from mach_lightning import internals

# The hooks Lightning fires from inside manual_backward and LightningOptimizer.step.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def lean_step_blockers(trainer, module: LightningModule, lightning_optimizers: list) -> list[str]:
    """Why this run must keep Lightning's full backward/step path; empty when it need not.
    (`lightning_optimizers` no longer decides it: each DirectStep picks its own step path.)"""
    blockers = []
    if type(trainer.precision_plugin) is not Precision:
        blockers.append(f"precision {trainer.precision} scales or casts in its plugin")
    if type(trainer.strategy) is not SingleDeviceStrategy:
        blockers.append(f"strategy {type(trainer.strategy).__name__} acts around backward")
    for hook in STEP_HOOKS:
        blockers += [
            f"callback {type(cb).__name__} listens to {hook}"
            for cb in trainer.callbacks
            if is_overridden(hook, cb, Callback)
        ]
    for hook in (*STEP_HOOKS, "backward"):
        if is_overridden(hook, module, LightningModule):
            blockers.append(f"{type(module).__name__} overrides {hook}")
    return blockers


def counts_steps_directly(lightning_optimizer) -> bool:
    """Whether a DirectStep can count its steps itself: internals.LEAN_STEP_COUNT is on and the
    LightningOptimizer has the two callbacks (tests/test_internals.py checks that they do)."""
    return internals.LEAN_STEP_COUNT and all(
        callable(getattr(lightning_optimizer, name, None))
        for name in ("_on_before_step", "_on_after_step")
    )


class DirectStep:
    """A LightningOptimizer's torch optimizer, stepped directly.

    `step()` runs the wrapped optimizer between the two callbacks Lightning's manual-optimization
    loop installs on the LightningOptimizer for the current batch (they count the step towards
    `trainer.global_step` and time it for Lightning's profiler); without them (see
    `counts_steps_directly`) it is `LightningOptimizer.step`. Anything else is read from the
    LightningOptimizer, so `.optimizer`, `.param_groups` and `.state` work as before.
    """

    def __init__(self, lightning_optimizer):
        self.lightning_optimizer = lightning_optimizer
        self.optimizer = lightning_optimizer.optimizer
        self.direct = counts_steps_directly(lightning_optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> Any:
        if not self.direct:
            return self.lightning_optimizer.step(closure)
        self.lightning_optimizer._on_before_step()  # reassigned by Lightning every batch
        output = self.optimizer.step(closure)
        self.lightning_optimizer._on_after_step()
        return output

    def __getattr__(self, name: str) -> Any:
        if name == "lightning_optimizer":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.lightning_optimizer, name)
