"""Per-rank in-flight state under DDP: each rank trains its own batches, so its delay queues,
replay buffers and meter window are its own. All of them go into the checkpoint (which rank 0
writes) and each rank resumes from its own; loading rank 0's everywhere made a resumed DDP run
diverge from an uninterrupted one."""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist

from mach_lightning.config import ConfigError


def gather_from_ranks(state: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's state, in rank order (a collective: every rank saves at the same hook)."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def state_of_rank(
    ranks: list[dict[str, Any]] | None, rank: int, world_size: int, fallback: dict[str, Any]
) -> dict[str, Any]:
    """This rank's saved state; `fallback` (rank 0's) for a checkpoint without per-rank states."""
    if ranks is None:
        if world_size > 1:
            warnings.warn(
                "This checkpoint holds rank 0's in-flight state only (written by an older "
                "version); every rank resumes from it, so the resumed run is not exact.",
                stacklevel=2,
            )
        return fallback
    if len(ranks) != world_size:
        raise ConfigError(
            f"The checkpoint holds the in-flight state of {len(ranks)} ranks, but this run has "
            f"{world_size}. Resume with the devices and nodes it was trained with."
        )
    return ranks[rank]
