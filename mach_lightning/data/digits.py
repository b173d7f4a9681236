"""scikit-learn's bundled 8x8 handwritten digits: 1,797 images, no files, no network.

The release has no test split, so a fixed 20% is held out as one, drawn with seed 0 whatever
the run's seed: the test set must not change between the runs it is used to compare.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from mach_lightning.data.registry import DatasetSource, RawSplits, cached, register_dataset

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0
NUM_EXAMPLES = 1797


@register_dataset("digits")
class Digits(DatasetSource):
    input_shape = (1, 8, 8)
    num_classes = 10
    num_train_examples = NUM_EXAMPLES - round(NUM_EXAMPLES * TEST_FRACTION)

    @classmethod
    def load(cls, data_cfg) -> RawSplits:
        return cached("sklearn-digits", _parse)


def _parse() -> RawSplits:
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.uint8).unsqueeze(1)  # grey levels 0..16
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    num_test = round(len(images) * TEST_FRACTION)
    test, train = order[:num_test], order[num_test:]
    return RawSplits(images[train], labels[train], images[test], labels[test], max_value=16)
