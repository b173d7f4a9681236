"""The LightningDataModule: a whole dataset as float tensors in memory, served by index."""

from __future__ import annotations

import lightning as L
import torch

from mach_lightning.data.loader import TensorBatchLoader
from mach_lightning.data.registry import get_dataset


class InMemoryDataModule(L.LightningDataModule):
    """Train/validation/test splits of a registered dataset, held as float32 tensors.

    `input_shape` and `num_classes` come from the dataset's constants and are known at
    construction. `setup` loads the files, scales images to [0, 1], holds out a validation share of
    the training set (drawn with the run's seed) and, if data_cfg.normalize, standardises every
    split per channel with the mean and std of the remaining training images.
    """

    def __init__(self, data_cfg, seed: int) -> None:
        super().__init__()
        self.data_cfg = data_cfg
        self.seed = seed
        self.dataset = get_dataset(data_cfg.name)
        self.input_shape: tuple[int, int, int] = tuple(self.dataset.input_shape)
        self.num_classes: int = self.dataset.num_classes
        self.channel_mean: torch.Tensor | None = None  # set by setup when normalising
        self.channel_std: torch.Tensor | None = None
        self.max_value: float | None = None  # what the raw files' values are divided by
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def train_size(self) -> int:
        """Training examples after the validation split (all ranks together under DDP).

        Exact after setup; before it, computed from the dataset's published size.
        """
        if self._splits is not None:
            return len(self._splits["train"][1])
        total = self.dataset.num_train_examples
        return total - self._num_val(total)

    def _num_val(self, total: int) -> int:
        return max(1, round(total * self.data_cfg.val_fraction))

    def prepare_data(self) -> None:
        """Find, download if allowed, and check the files: a DataError here stops the run early."""
        self.dataset.load(self.data_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:  # fit, validate and test share one setup
            return
        raw = self.dataset.load(self.data_cfg)
        self.max_value = raw.max_value
        order = torch.randperm(
            len(raw.train_labels), generator=torch.Generator().manual_seed(self.seed)
        )
        num_val = self._num_val(len(order))
        val, train = order[:num_val], order[num_val:]

        def scaled(images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
            # Selecting before converting moves a quarter of the bytes: uint8, not float32.
            selected = images if indices is None else images.index_select(0, indices)
            return selected.float().div_(raw.max_value)

        splits = {
            "train": (scaled(raw.train_images, train), raw.train_labels[train]),
            "val": (scaled(raw.train_images, val), raw.train_labels[val]),
            "test": (scaled(raw.test_images), raw.test_labels),
        }
        if self.data_cfg.normalize:
            train_images = splits["train"][0]
            self.channel_mean = train_images.mean(dim=(0, 2, 3))
            self.channel_std = train_images.std(dim=(0, 2, 3))
            splits = {name: (self._standardise(x), y) for name, (x, y) in splits.items()}
        self._splits = splits

    def state_dict(self) -> dict:
        """The input scaling and normalisation, saved in every checkpoint so an exported model
        takes raw inputs without recomputing them (export_input.py)."""
        return {
            "max_value": self.max_value,
            "channel_mean": self.channel_mean,
            "channel_std": self.channel_std,
        }

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: setup() recomputes the same constants from the same data."""

    def _standardise(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.channel_mean.view(1, -1, 1, 1)
        return images.sub_(mean).div_(self.channel_std.view(1, -1, 1, 1))

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._splits is None:
            raise RuntimeError(f"Call setup() before asking for the {name} dataloader.")
        return self._splits[name]

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def train_dataloader(self) -> TensorBatchLoader:
        # Under DDP each rank serves its own shard of the same per-epoch permutation.
        distributed = self.trainer is not None and self.trainer.world_size > 1
        rank, world_size = (
            (self.trainer.global_rank, self.trainer.world_size) if distributed else (0, 1)
        )
        return TensorBatchLoader(
            *self._split("train"),
            self.data_cfg.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            epoch_source=self._trainer_epoch,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Batches already on the device (the CPU case) pass as they are, skipping Lightning's
        generic walk over the collection, a few percent of a small model's step."""
        if all(t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._split("val"), self.data_cfg.eval_batch_size)

    def test_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._split("test"), self.data_cfg.eval_batch_size)
