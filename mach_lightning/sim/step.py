"""One training step of the simulator, around the driver: probe, backward, optimizer steps.

The skeleton every method shares, written once: the nodes step (sim/driver.py), the gradient
probe measures at the weights of this step, every optimizer's gradient is cleared, one backward
runs, the gradients that reached delayed links go on their way, and each node that applied
something steps its own optimizers (after its DC-ASGD hook, if any).
"""

from __future__ import annotations

from typing import Any

import torch

from mach_lightning.sim.simtime_measure import Work

# Checkpoints' in-flight state: 2 = typed messages and stored forwards per node (this layout).
STATE_FORMAT = 2


def train_step(module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch step `module.batch_step` of every node; returns the logged loss and logits."""
    step, diagnostics = module.batch_step, module.diagnostics
    delays = module.schedule.delays(step)
    probe = diagnostics.probe if diagnostics is not None else None
    if probe is not None:
        probe.keep(step, x, y, [step + d for d in delays])
    result = module.driver.forward(x, y, step, delays, module.schedule.active(step))
    applied = result.applied()
    measured = None
    if probe is not None and probe.is_due(step):  # the weights are still those of step t
        measured = probe.measure(step, module.components, x, y, applied)
    optimizers = module.component_optimizers()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    module.manual_backward(result.objective)
    module.driver.after_backward(result, step)
    for node in module.driver.nodes:
        out = result.outboxes[node.index]
        if not out.updates:
            continue
        own = [optimizers[index] for index in node.optimizers]
        for hook in out.before_step:
            hook(own)
        for optimizer in own:
            optimizer.step()
        if diagnostics is not None:
            for age in out.ages if out.ages is not None else [step - b for b in out.applied]:
                diagnostics.staleness.record(module.driver.component_of[node.index], age)
    if measured is not None:
        diagnostics.probe_metrics = probe.compare(measured, module.components, applied)
    if probe is not None:
        probe.forget(step)
    main = next(o for o in result.outboxes.values() if o.logits is not None)
    return {"loss": main.logged_loss(y), "logits": main.logits.detach()}


def measure(clock, module, x: torch.Tensor, step: int) -> None:
    """Time (or count) each node's work for simulated time: the rule's own, or a chain."""
    rule = module.rule
    works = getattr(rule, "node_work", None)
    if works is None:
        clock.measure(module.components, x, step)
    else:
        build = lambda: [Work(fn, params, size) for fn, params, size in works(x)]  # noqa: E731
        clock.measure_work(module, build, x.device, step)
    if clock.times_optimizers:  # each component's optimizers: its nodes' (simtime.optimizer_step)
        groups, per = rule.optimizer_groups(), [[] for _ in clock.fwd_ms]
        for node in module.driver.nodes:
            i = module.driver.component_of[node.index]
            if i < len(per):
                per[i].extend(groups[j] for j in node.optimizers)
        clock.measure_optimizers(module, per, x.device, step)


class StateFormatError(RuntimeError):
    """A checkpoint's in-flight state is in a layout this version cannot resume from."""


def check_state_format(state: dict[str, Any]) -> None:
    """Refuse, naming why, the in-flight state of checkpoints written before the core split."""
    if not state or state.get("format") == STATE_FORMAT:
        return
    old = [k for k in ("queue", "messages", "stored", "targets", "buffers") if state.get(k)]
    if old:
        raise StateFormatError(
            "this checkpoint was written by an older mach_lightning, before methods became rules "
            f"(its in-flight state, {', '.join(old)}, uses the old per-method queues), so "
            "training cannot resume from it exactly; its weights still load: evaluate or export "
            "it, or start a new run."
        )
