"""The simulator: every node of a method in one process, on one clock (the lockstep runtime).

module       the LightningModule driving a method's rule (`create_topology`)
driver       one step of every node: inboxes, links (live or delayed), messages in flight
step         the step's skeleton: probe, one backward, each node's optimizer steps
staleness    schedules: each component's delay per step (registry: staleness.schedule)
simtime      simulated parallel wall-clock from measured per-component timings
diagnostics  applied-staleness histograms and cosine with the true synchronous gradient
lean_steps   backward and optimizer steps without Lightning's pass-through layers, when safe
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so that importing one submodule (e.g. sim.staleness) does not build the whole runtime.
    if name in ("TopologyModule", "create_topology"):
        from mach_lightning.sim import module

        return getattr(module, name)
    raise AttributeError(name)
