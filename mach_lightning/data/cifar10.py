"""CIFAR-10, from the "python version" release: pickled batches in cifar-10-batches-py/.

The batches are looked for in data.root/cifar-10-batches-py/, data.root itself and
data.root/cifar10/cifar-10-batches-py/. When they are missing but the release archive
cifar-10-python.tar.gz lies in data.root (put there by hand, or downloaded when allowed), it is
checked and extracted. Checksums are verified before unpickling, so with data.verify=true only the
published files are ever unpickled.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from mach_lightning.data.files import (
    corrupt_error,
    download,
    download_hint,
    file_key,
    find_folder,
    md5_file,
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

TITLE = "CIFAR-10"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
SOURCE_HINT = f"The release is {ARCHIVE_URL}: put it, still packed, into data.root."


@register_dataset("cifar10")
class CIFAR10(DatasetSource):
    input_shape = (3, 32, 32)
    num_classes = 10
    num_train_examples = 50_000

    @classmethod
    def load(cls, data_cfg) -> RawSplits:
        folder, extracted = _locate(data_cfg)
        paths = [folder / name for name in BATCH_MD5]
        verify = data_cfg.verify or extracted
        return cached(("cifar10", verify, file_key(paths)), lambda: _parse(folder, verify))


def _locate(data_cfg) -> tuple[Path, bool]:
    """The folder holding all six batches (extracting the archive if needed), and if it did."""
    root = Path(data_cfg.root).expanduser().resolve()
    candidates = [root / FOLDER, root, root / "cifar10" / FOLDER]
    folder = find_folder(candidates, list(BATCH_MD5))
    if folder is not None:
        return folder, False
    archive = root / ARCHIVE
    if not archive.is_file():
        if not (data_cfg.download and network_reachable(ARCHIVE_URL)):
            hint = (
                f"{download_hint(data_cfg.download, ARCHIVE_URL)} Alternatively put the archive "
                f"{ARCHIVE}, still packed, into {root}/: it is checked and extracted on first use."
            )
            raise missing_error(TITLE, candidates, list(BATCH_MD5), hint)
        download(ARCHIVE_URL, archive)
    _extract(archive, root)
    return root / FOLDER, True


def _extract(archive: Path, root: Path) -> None:
    """Unpack the release archive into root, after checking it is the published one."""
    if md5_file(archive) != ARCHIVE_MD5:
        raise corrupt_error(
            TITLE, archive, "its md5 checksum is not the published one", SOURCE_HINT
        )
    # The "data" filter refuses links and paths leaving root; Pythons older than 3.10.12 lack it,
    # where the checksum above is what vouches for the archive's contents.
    safe_members = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, **safe_members)
    except (OSError, EOFError, tarfile.TarError) as err:
        raise corrupt_error(
            TITLE, archive, f"it cannot be extracted ({err})", SOURCE_HINT
        ) from None


def _parse(folder: Path, verify: bool) -> RawSplits:
    train_images, train_labels = _read_batches([folder / n for n in TRAIN_BATCHES], verify)
    test_images, test_labels = _read_batches([folder / n for n in TEST_BATCHES], verify)
    return RawSplits(train_images, train_labels, test_images, test_labels)


def _read_batches(paths: list[Path], verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(_read_batch(path, verify) for path in paths))
    images_nchw = np.concatenate(images).reshape(-1, *CIFAR10.input_shape)
    return torch.from_numpy(images_nchw), torch.from_numpy(np.concatenate(labels))


def _read_batch(path: Path, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch: images as (N, 3072) uint8 rows, labels as int64."""
    if verify and md5_file(path) != BATCH_MD5[path.name]:
        raise _corrupt(path, "its md5 checksum is not the published one")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # unpickling damaged bytes can raise almost any exception type
        raise _corrupt(path, f"it cannot be unpickled ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _corrupt(path, "it is not a dict with b'data' and b'labels'")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"its data is {images.dtype} {images.shape}, not uint8 (N, 3072)")
    if labels.shape != (len(images),) or not ((labels >= 0) & (labels < 10)).all():
        raise _corrupt(path, f"its labels are not {len(images)} class numbers in 0..9")
    return images, labels


def _corrupt(path: Path, reason: str) -> DataError:
    return corrupt_error(TITLE, path, reason, SOURCE_HINT)
