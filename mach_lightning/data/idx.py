"""MNIST and Fashion-MNIST: the four gzipped IDX files of the original releases.

Files are looked for in data.root/<name>/, then data.root itself, then system folders (the Debian
package dataset-fashion-mnist). Verification accepts a file when either the .gz or the IDX data
inside it has the published md5: redistributors such as Debian recompress the files, which
changes the first checksum but not the second. IDX headers and sizes are always checked.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from mach_lightning.data.files import (
    corrupt_error,
    download,
    download_hint,
    file_key,
    find_folder,
    md5,
    missing_error,
    network_reachable,
)
from mach_lightning.data.registry import (
    DataError,
    DatasetSource,
    RawSplits,
    cached,
    register_dataset,
)

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IDX_UNSIGNED_BYTE = 0x08


def parse_idx(payload: bytes, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes; ValueError saying what is wrong with its header or size."""
    expected_magic = bytes([0, 0, IDX_UNSIGNED_BYTE, ndim])
    header_size = 4 + 4 * ndim
    if len(payload) < header_size or payload[:4] != expected_magic:
        raise ValueError(
            f"its header starts with {payload[:4].hex() or 'nothing'} instead of "
            f"{expected_magic.hex()} (IDX, {ndim}-d array of unsigned bytes)"
        )
    dims = struct.unpack(f">{ndim}I", payload[4:header_size])
    if len(payload) - header_size != math.prod(dims):
        raise ValueError(
            f"its header promises {math.prod(dims)} bytes of data but it holds "
            f"{len(payload) - header_size}"
        )
    return np.frombuffer(payload, np.uint8, offset=header_size).reshape(dims)


class IdxDataset(DatasetSource):
    """A dataset in the MNIST file format: 60,000 + 10,000 grey 28x28 images, 10 classes."""

    input_shape = (1, 28, 28)
    num_classes = 10
    num_train_examples = 60_000
    title: ClassVar[str]
    mirror: ClassVar[str]  # folder URL the four files are downloaded from
    checksums: ClassVar[dict[str, tuple[str, str]]]  # file -> (md5 of the .gz, md5 of its IDX)
    system_folders: ClassVar[tuple[Path, ...]] = ()
    install_hint: ClassVar[str] = ""

    @classmethod
    def load(cls, data_cfg) -> RawSplits:
        folder, downloaded = cls._locate(data_cfg)
        paths = [folder / name for name in IDX_FILES]
        verify = data_cfg.verify or downloaded
        return cached((cls.name, verify, file_key(paths)), lambda: cls._parse(paths, verify))

    @classmethod
    def _locate(cls, data_cfg) -> tuple[Path, bool]:
        """The folder holding all four files (downloading them if allowed), and if it downloaded."""
        root = Path(data_cfg.root).expanduser().resolve()
        candidates = [root / cls.name, root, *cls.system_folders]
        folder = find_folder(candidates, IDX_FILES)
        if folder is not None:
            return folder, False
        if data_cfg.download and network_reachable(cls.mirror):
            target = root / cls.name
            for name in IDX_FILES:
                if not (target / name).is_file():
                    download(cls.mirror + name, target / name)
            return target, True
        hint = download_hint(data_cfg.download, cls.mirror) + cls.install_hint
        raise missing_error(cls.title, candidates, IDX_FILES, hint)

    @classmethod
    def _parse(cls, paths: list[Path], verify: bool) -> RawSplits:
        train_images, train_labels, test_images, test_labels = paths
        return RawSplits(
            *cls._read_split(train_images, train_labels, verify),
            *cls._read_split(test_images, test_labels, verify),
        )

    @classmethod
    def _read_split(
        cls, images_path: Path, labels_path: Path, verify: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = cls._read_idx(images_path, 3, verify)
        labels = cls._read_idx(labels_path, 1, verify)
        if images.shape[1:] != cls.input_shape[1:]:
            raise cls._corrupt(images_path, f"it holds {images.shape[1:]} images, not 28x28")
        if len(images) != len(labels):
            raise cls._corrupt(
                labels_path, f"it holds {len(labels)} labels for {len(images)} images"
            )
        if labels.max(initial=0) >= cls.num_classes:
            raise cls._corrupt(labels_path, f"it holds label {labels.max()} (classes are 0..9)")
        images_nchw = torch.from_numpy(images.copy()).unsqueeze(1)
        return images_nchw, torch.from_numpy(labels.astype(np.int64))

    @classmethod
    def _read_idx(cls, path: Path, ndim: int, verify: bool) -> np.ndarray:
        compressed = path.read_bytes()
        try:
            payload = gzip.decompress(compressed)
        except (OSError, EOFError, zlib.error) as err:
            raise cls._corrupt(path, f"it is not a complete gzip file ({err})") from None
        gz_md5, idx_md5 = cls.checksums[path.name]
        if verify and md5(compressed) != gz_md5 and md5(payload) != idx_md5:
            raise cls._corrupt(path, "its md5 checksum is not the published one")
        try:
            return parse_idx(payload, ndim)
        except ValueError as err:
            raise cls._corrupt(path, str(err)) from None

    @classmethod
    def _corrupt(cls, path: Path, reason: str) -> DataError:
        hint = f"The original is published at {cls.mirror}{path.name}.{cls.install_hint}"
        return corrupt_error(cls.title, path, reason, hint)


@register_dataset("mnist")
class MNIST(IdxDataset):
    title = "MNIST"
    mirror = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    checksums = {
        TRAIN_IMAGES: ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        TRAIN_LABELS: ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        TEST_IMAGES: ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        TEST_LABELS: ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    }


@register_dataset("fashion_mnist")
class FashionMNIST(IdxDataset):
    title = "Fashion-MNIST"
    mirror = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    checksums = {
        TRAIN_IMAGES: ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        TRAIN_LABELS: ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        TEST_IMAGES: ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        TEST_LABELS: ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    }
    system_folders = (Path("/usr/share/datasets/fashion-mnist"),)
    install_hint = (
        " On Debian or Ubuntu, `apt-get install dataset-fashion-mnist` installs them into "
        "/usr/share/datasets/fashion-mnist/, which is searched automatically."
    )
