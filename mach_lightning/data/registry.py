"""The dataset registry, the raw form every dataset loads into, and the error they raise.

A dataset is a `DatasetSource` subclass registered under a name with `@register_dataset(name)`.
It declares its image shape and class count as class constants (so models can be built before any
file is read) and implements `load(data_cfg)`, which finds, fetches and checks its files and
returns the images as uint8 tensors. Scaling, splitting and normalising happen in the data module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch


class DataError(Exception):
    """A dataset that cannot be used, explained in one paragraph: what, which files, how to fix."""


@dataclass(frozen=True)
class RawSplits:
    """A dataset as stored on disk: uint8 images (N, C, H, W) and int64 labels per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    max_value: int = 255  # dividing the images by this maps them onto [0, 1]


class DatasetSource(ABC):
    """One dataset: its shape constants and how to load it."""

    name: ClassVar[str] = ""
    input_shape: ClassVar[tuple[int, int, int]]
    num_classes: ClassVar[int]
    num_train_examples: ClassVar[int]  # before the validation split; the published size

    @classmethod
    @abstractmethod
    def load(cls, data_cfg) -> RawSplits:
        """Find (or download), verify and parse the files; raise DataError when that fails."""


DATASETS: dict[str, type[DatasetSource]] = {}

# Parsed datasets by a key naming their files, so repeated setup (tests, fit then test) is free.
_PARSED: dict[Hashable, RawSplits] = {}


def register_dataset(name: str) -> Callable[[type[DatasetSource]], type[DatasetSource]]:
    """Class decorator: make a DatasetSource subclass available as data.name=<name>."""

    def register(cls: type[DatasetSource]) -> type[DatasetSource]:
        if name in DATASETS and DATASETS[name] is not cls:
            raise ValueError(f"Dataset name '{name}' is already taken by {DATASETS[name]}.")
        cls.name = name
        DATASETS[name] = cls
        return cls

    return register


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> type[DatasetSource]:
    if name not in DATASETS:
        raise DataError(
            f"Unknown dataset '{name}'. Set data.name to one of: {', '.join(list_datasets())}."
        )
    return DATASETS[name]


def cached(key: Hashable, parse: Callable[[], RawSplits]) -> RawSplits:
    """The parsed dataset for this key, parsing it only the first time in this process."""
    if key not in _PARSED:
        _PARSED[key] = parse()
    return _PARSED[key]
