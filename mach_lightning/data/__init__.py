"""Datasets as in-memory LightningDataModules: `create_datamodule(cfg.data, cfg.seed)`.

Each dataset is a `DatasetSource` subclass registered with `@register_dataset(name)`; importing
this package registers the built-in ones (digits, mnist, fashion_mnist, cifar10) and tells the
config validator which names data.name accepts.
"""

from __future__ import annotations

from mach_lightning.config import register_choices

# Importing a dataset module registers it. Keep this list in sync with the files here.
from mach_lightning.data import cifar10, digits, idx  # noqa: F401
from mach_lightning.data.loader import TensorBatchLoader
from mach_lightning.data.module import InMemoryDataModule
from mach_lightning.data.registry import (
    DataError,
    DatasetSource,
    RawSplits,
    list_datasets,
    register_dataset,
)


def create_datamodule(data_cfg, seed: int) -> InMemoryDataModule:
    """The data module for data_cfg.name; files are only read by prepare_data() and setup()."""
    return InMemoryDataModule(data_cfg, seed)


register_choices("data.name", list_datasets)

__all__ = [
    "DataError",
    "DatasetSource",
    "InMemoryDataModule",
    "RawSplits",
    "TensorBatchLoader",
    "create_datamodule",
    "list_datasets",
    "register_dataset",
]
