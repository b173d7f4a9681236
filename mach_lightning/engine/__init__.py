"""Shared machinery for stale and decoupled training, used by the topologies.

staleness    schedules: each component's delay per step (registry: staleness.schedule)
delay        in-flight queues, replay buffers and weight snapshots (stash vs recompute)
dcasgd       DC-ASGD delay compensation as a wrapper around any torch optimizer
simtime      simulated parallel wall-clock from measured per-component timings
diagnostics  applied-staleness histograms and cosine with the true synchronous gradient
lean_steps   backward and optimizer steps without Lightning's pass-through layers, when safe
"""
