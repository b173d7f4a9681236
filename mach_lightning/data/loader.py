"""Batches cut from in-memory tensors by indexing: no Dataset, no per-sample work, no workers.

The training loader is resumable mid-epoch. Epoch e's order is a permutation drawn from a
generator seeded with (seed, e) alone, so it is the same in a run that was interrupted and resumed
as in one that was not, and the loader's position is just (epoch, batches served), which
Lightning saves in checkpoints and restores before iterating again. See `TensorBatchLoader`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for one epoch's order, well mixed so nearby (seed, epoch) pairs differ."""
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1)[0])


class TensorBatchLoader:
    """An iterable of (inputs, targets) batches taken from two in-memory tensors.

    Each pass (`iter`) serves one epoch. With shuffle, epoch e's order is a permutation seeded by
    (seed, e); without, it is the stored order. For world_size > 1 (DDP) the epoch's order is cut
    to a multiple of world_size and rank r takes every world_size-th sample from position r: the
    ranks' shards are disjoint and equally long, so every rank runs the same number of batches.
    The last batch may be partial; nothing else is dropped.

    Which epoch a pass serves is decided when its first batch is requested, not at `iter()`:
    - by default the pass after a complete or abandoned one serves the next epoch, and
    - a position loaded with `load_state_dict` (or a fresh loader's epoch 0, batch 0) is resumed:
      the pass serves that epoch from its next batch, or the following epoch if it was complete;
    - epoch_source, when given and returning an int (the trainer's current epoch), overrides the
      epoch number. A loaded position for another epoch is then stale, e.g. saved at the end of an
      epoch cut short by limit_train_batches, and the pass starts at batch 0.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_source: Callable[[], int | None] | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets.")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Bad batch_size={batch_size}, rank={rank}, world_size={world_size}.")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch_source = epoch_source
        self.samples_per_rank = len(inputs) // world_size
        self._epoch = 0  # epoch of the pass being (or last) served
        self._batches_done = 0  # batches of that epoch served so far
        self._resume_pending = True  # the next pass resumes (_epoch, _batches_done)

    def __len__(self) -> int:
        """Batches in a whole epoch on this rank, also when a pass resumes part-way."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for one epoch, in the order they are served."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(len(self.inputs), generator=generator)
        else:
            order = torch.arange(len(self.inputs))
        return order[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: nothing below runs until the first batch is requested, by when Lightning has
        # restored loader state and advanced trainer.current_epoch (it calls iter() before both).
        epoch, first_batch = self._start_pass()
        self._epoch, self._batches_done = epoch, first_batch
        indices = self.epoch_indices(epoch)
        for batch in range(first_batch, len(self)):
            batch_indices = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            # Counted before yielding: a checkpoint saved while this batch trains resumes after it.
            self._batches_done = batch + 1
            yield self.inputs.index_select(0, batch_indices), self.targets[batch_indices]

    def _start_pass(self) -> tuple[int, int]:
        """The epoch the pass now starting serves, and the batch it starts from."""
        resume = self._resume_pending and self._batches_done < len(self)
        self._resume_pending = False
        epoch, first_batch = (self._epoch, self._batches_done) if resume else (self._epoch + 1, 0)
        if self.epoch_source is not None:
            source_epoch = self.epoch_source()
            if source_epoch is not None and source_epoch != epoch:
                epoch, first_batch = source_epoch, 0
        return epoch, first_batch

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch being served and how many of its batches have been served."""
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue from a saved position: the next pass serves the rest of that epoch."""
        self._epoch = int(state_dict["epoch"])
        self._batches_done = int(state_dict["batches_done"])
        self._resume_pending = True
