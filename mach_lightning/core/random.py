"""Random numbers that depend only on where they are drawn: (seed, step, salt), never on order.

A staleness schedule's random delays and local's replay samples draw from a fresh generator seeded
by the run's seed, the batch step and a salt (e.g. the component): the same seed gives the same
draws, and a resumed run draws exactly what an uninterrupted one would, with no generator state
to checkpoint. It lives in core so that both the schedules (sim) and the rules (methods) use it.
"""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A generator seeded by (seed, step, salt): reproducible, resumable, independent of order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + salt)
