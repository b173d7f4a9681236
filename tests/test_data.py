"""Data modules on real files: splits, normalisation, batch order, resume, and file errors.

Nothing is downloaded: every config sets data.download=false. MNIST comes from the repo's sibling
folder shared/data/mnist, Fashion-MNIST from the Debian package's folder, and CIFAR-10 from tiny
batches in the release's pickle format written to tmp_path.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from mach_lightning.config import CHOICES, DataConfig
from mach_lightning.data import (
    DataError,
    InMemoryDataModule,
    TensorBatchLoader,
    create_datamodule,
    list_datasets,
)
from mach_lightning.data.idx import IDX_FILES, TEST_LABELS, TRAIN_LABELS

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def data_cfg(name: str, root: Path | str = "data", **fields):
    cfg = OmegaConf.structured(DataConfig)
    cfg.name, cfg.root, cfg.download = name, str(root), False
    for key, value in fields.items():
        cfg[key] = value
    return cfg


def set_up(name: str, root: Path | str = "data", seed: int = 0, **fields) -> InMemoryDataModule:
    datamodule = create_datamodule(data_cfg(name, root, **fields), seed)
    datamodule.setup("fit")
    return datamodule


def all_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def rows(images: torch.Tensor) -> list[bytes]:
    """Images as sorted byte strings: equal lists mean the same multiset of images."""
    return sorted(image.numpy().tobytes() for image in images)


# --- registry and digits ---------------------------------------------------------------------


def test_registry_lists_datasets_and_feeds_the_config_validator():
    assert list_datasets() == ["cifar10", "digits", "fashion_mnist", "mnist"]
    assert CHOICES["data.name"]() == list_datasets()
    with pytest.raises(DataError, match="Unknown dataset 'mnsit'.*mnist"):
        create_datamodule(data_cfg("mnsit"), 0)


def test_digits_shapes_split_sizes_and_normalisation():
    datamodule = create_datamodule(data_cfg("digits"), 0)
    assert (datamodule.input_shape, datamodule.num_classes) == ((1, 8, 8), 10)
    size_before_setup = datamodule.train_size
    datamodule.setup("fit")
    assert datamodule.train_size == size_before_setup == 1438 - 144
    train_x, train_y = datamodule.train_dataloader().inputs, datamodule.train_dataloader().targets
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert train_x.shape == (1294, 1, 8, 8)
    assert len(datamodule.val_dataloader().inputs) == 144
    assert len(datamodule.test_dataloader().inputs) == 359
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4
    assert set(train_y.tolist()) == set(range(10))


def test_digits_test_split_ignores_the_seed_and_val_split_follows_it():
    seed0, again, seed1 = (set_up("digits", seed=s, normalize=False) for s in (0, 0, 1))
    assert torch.equal(seed0.test_dataloader().inputs, seed1.test_dataloader().inputs)
    assert torch.equal(seed0.val_dataloader().inputs, again.val_dataloader().inputs)
    assert not torch.equal(seed0.val_dataloader().inputs, seed1.val_dataloader().inputs)


def test_val_and_train_partition_the_training_split():
    datamodule = set_up("digits", normalize=False)
    raw = datamodule.dataset.load(datamodule.data_cfg)
    train, val = datamodule.train_dataloader().inputs, datamodule.val_dataloader().inputs
    to_uint8 = lambda x: (x * raw.max_value).round().to(torch.uint8)  # noqa: E731
    assert rows(to_uint8(torch.cat([train, val]))) == rows(raw.train_images)
    assert datamodule.train_size + len(val) == len(raw.train_images)


def test_dataloaders_serve_every_example_once_in_batches():
    datamodule = set_up("digits", batch_size=100, eval_batch_size=1000)
    train = all_batches(datamodule.train_dataloader())
    assert [len(y) for _, y in train] == [100] * 12 + [94]
    assert rows(torch.cat([x for x, _ in train])) == rows(datamodule.train_dataloader().inputs)
    assert [len(y) for _, y in datamodule.val_dataloader()] == [144]


def test_batches_already_on_the_device_pass_as_they_are():
    datamodule = set_up("digits", batch_size=100, eval_batch_size=1000)
    batch = next(iter(datamodule.train_dataloader()))
    assert datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = datamodule.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [t.device.type for t in moved] == ["meta", "meta"]
    assert [t.shape for t in moved] == [t.shape for t in batch]


# --- MNIST and Fashion-MNIST from real files -------------------------------------------------


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    if not all((MNIST_DIR / name).is_file() for name in IDX_FILES):
        pytest.skip(f"MNIST's four IDX .gz files are not in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def mnist_module(mnist_dir) -> InMemoryDataModule:
    return set_up("mnist", mnist_dir)


def test_mnist_shapes_sizes_and_normalisation(mnist_module):
    assert (mnist_module.input_shape, mnist_module.num_classes) == ((1, 28, 28), 10)
    train_x = mnist_module.train_dataloader().inputs
    assert train_x.shape == (54_000, 1, 28, 28) and mnist_module.train_size == 54_000
    assert len(mnist_module.val_dataloader().targets) == 6_000
    assert mnist_module.test_dataloader().inputs.shape == (10_000, 1, 28, 28)
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-3
    x, y = next(iter(mnist_module.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.dtype == torch.int64


def test_mnist_is_found_in_a_root_subfolder_named_after_the_dataset(mnist_dir, tmp_path):
    (tmp_path / "mnist").symlink_to(mnist_dir, target_is_directory=True)
    datamodule = create_datamodule(data_cfg("mnist", tmp_path), 0)
    datamodule.prepare_data()  # raises when the files are not found


def test_fashion_mnist_comes_from_the_debian_package_and_verifies(tmp_path):
    if not (FASHION_DIR / IDX_FILES[0]).is_file():
        pytest.skip(f"Fashion-MNIST not in {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    # The package recompresses the .gz files, so this passes on the md5 of the IDX data inside.
    cfg = data_cfg("fashion_mnist", tmp_path, verify=True)
    raw = create_datamodule(cfg, 0).dataset.load(cfg)
    assert raw.train_images.shape == (60_000, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert torch.bincount(raw.test_labels).tolist() == [1000] * 10


# --- broken and missing files ----------------------------------------------------------------


def mnist_copy_with(mnist_dir: Path, folder: Path, name: str, content: bytes) -> Path:
    """A folder of links to the real MNIST files, except `name`, which holds `content`."""
    folder.mkdir()
    for other in IDX_FILES:
        if other != name:
            (folder / other).symlink_to(mnist_dir / other)
    (folder / name).write_bytes(content)
    return folder


def real_idx(mnist_dir: Path, name: str) -> bytes:
    return gzip.decompress((mnist_dir / name).read_bytes())


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_gzip_is_named_with_the_fix(mnist_dir, tmp_path, verify):
    truncated = (mnist_dir / TRAIN_LABELS).read_bytes()[:-100]
    folder = mnist_copy_with(mnist_dir, tmp_path / "mnist", TRAIN_LABELS, truncated)
    with pytest.raises(DataError) as error:
        set_up("mnist", tmp_path, verify=verify)
    message = str(error.value)
    assert str(folder / TRAIN_LABELS) in message and "not a complete gzip file" in message
    assert "Delete train-labels-idx1-ubyte.gz and download it again" in message


def test_flipped_bytes_are_caught(mnist_dir, tmp_path):
    damaged = bytearray((mnist_dir / TRAIN_LABELS).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    mnist_copy_with(mnist_dir, tmp_path / "mnist", TRAIN_LABELS, bytes(damaged))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is corrupt"):
        set_up("mnist", tmp_path)


def test_wrong_content_fails_only_the_checksum(mnist_dir, tmp_path):
    labels = bytearray(real_idx(mnist_dir, TEST_LABELS))
    labels[-1] = (labels[-1] + 1) % 10  # a valid IDX file, one label changed
    mnist_copy_with(mnist_dir, tmp_path / "mnist", TEST_LABELS, gzip.compress(bytes(labels)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is corrupt.*md5 checksum"):
        set_up("mnist", tmp_path, verify=True)
    cfg = data_cfg("mnist", tmp_path, verify=False)
    assert create_datamodule(cfg, 0).dataset.load(cfg).test_labels[-1] == labels[-1]


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda idx: b"\x00\x00\x08\x03" + idx[4:], "header starts with 00000803 instead of"),
        (lambda idx: idx[:-10], "header promises 10000 bytes of data but it holds 9990"),
    ],
    ids=["magic", "size"],
)
def test_bad_idx_header_or_size_is_named_without_verify(mnist_dir, tmp_path, edit, reason):
    content = gzip.compress(edit(real_idx(mnist_dir, TEST_LABELS)))
    mnist_copy_with(mnist_dir, tmp_path / "mnist", TEST_LABELS, content)
    with pytest.raises(DataError, match=f"t10k-labels-idx1-ubyte.gz is corrupt.*{reason}"):
        set_up("mnist", tmp_path, verify=False)


def test_missing_files_are_listed_with_the_folder_to_put_them_in(mnist_dir, tmp_path):
    with pytest.raises(DataError) as error:
        create_datamodule(data_cfg("mnist", tmp_path), 0).prepare_data()
    message = str(error.value)
    assert all(name in message for name in IDX_FILES)
    assert f"Put them into {tmp_path / 'mnist'}/" in message and "data.download=true" in message

    for name in IDX_FILES[:2]:  # half the files straight in root: root is where the rest go
        shutil.copy(mnist_dir / name, tmp_path / name)
    with pytest.raises(DataError) as error:
        create_datamodule(data_cfg("mnist", tmp_path), 0).prepare_data()
    message = str(error.value)
    assert f"files {IDX_FILES[2]}, {IDX_FILES[3]} are missing" in message
    assert f"Put them into {tmp_path}/" in message


# --- CIFAR-10 from fake batches in the release format ----------------------------------------


def write_cifar_batches(folder: Path, per_batch: int = 4) -> np.ndarray:
    """Six pickled batches like the release's (b"data": uint8 (N, 3072), b"labels": list)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    first_images = None
    for name in names:
        images = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, b"labels": labels, b"batch_label": b"fake"}, f)
        first_images = images if first_images is None else first_images
    return first_images


def test_cifar10_fake_batches_load_channel_planes_in_order(tmp_path):
    first_images = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    datamodule = create_datamodule(data_cfg("cifar10", tmp_path, verify=False), 0)
    assert (datamodule.input_shape, datamodule.num_classes) == ((3, 32, 32), 10)
    raw = datamodule.dataset.load(datamodule.data_cfg)
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (4, 3, 32, 32)
    # Each row is the red plane, then green, then blue, each row-major 32x32.
    assert raw.train_images[0, 1, 2, 3] == first_images[0, 1024 + 2 * 32 + 3]
    datamodule.setup("fit")
    assert datamodule.train_size == 18 and len(datamodule.val_dataloader().targets) == 2


def test_cifar10_fake_batches_fail_verification_by_name(tmp_path):
    write_cifar_batches(tmp_path)  # straight in root, which is searched too
    with pytest.raises(DataError, match="data_batch_1 is corrupt.*md5 checksum"):
        create_datamodule(data_cfg("cifar10", tmp_path, verify=True), 0).prepare_data()


def test_cifar10_missing_says_where_and_names_the_archive(tmp_path):
    with pytest.raises(DataError) as error:
        create_datamodule(data_cfg("cifar10", tmp_path), 0).prepare_data()
    message = str(error.value)
    assert "data_batch_1, data_batch_2" in message and "test_batch are missing" in message
    assert f"Put them into {tmp_path / 'cifar-10-batches-py'}/" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


# --- TensorBatchLoader: order, DDP shards, resume --------------------------------------------


def numbered_loader(n: int = 10, batch_size: int = 4, **kwargs) -> TensorBatchLoader:
    """A loader whose inputs are their own indices, so batches show which examples they hold."""
    return TensorBatchLoader(torch.arange(n), torch.arange(n), batch_size, shuffle=True, **kwargs)


def served(loader: TensorBatchLoader) -> list[list[int]]:
    """One pass, as lists of example indices."""
    return [x.tolist() for x, _ in loader]


def test_each_pass_is_the_next_epoch_seeded_by_seed_and_epoch():
    loader, twin = numbered_loader(seed=3), numbered_loader(seed=3)
    epoch0, epoch1 = served(loader), served(loader)
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    assert epoch0 != epoch1
    assert served(twin) == epoch0 and served(twin) == epoch1
    assert served(numbered_loader(seed=4)) != epoch0
    assert sum(epoch1, []) == loader.epoch_indices(1).tolist()


def test_ddp_shards_are_disjoint_equal_and_cover_a_truncated_permutation():
    ranks = [numbered_loader(n=11, batch_size=2, seed=0, rank=r, world_size=3) for r in range(3)]
    shards = [sum(served(loader), []) for loader in ranks]
    assert [len(loader) for loader in ranks] == [2, 2, 2]
    assert [len(shard) for shard in shards] == [3, 3, 3]
    assert len(set().union(*shards)) == 9  # disjoint
    assert set().union(*shards) == set(numbered_loader(n=11, seed=0).epoch_indices(0)[:9].tolist())


def test_loaded_state_resumes_mid_epoch_with_exactly_the_remaining_batches():
    uninterrupted = numbered_loader(n=23, seed=1)
    epochs = [served(uninterrupted) for _ in range(3)]

    interrupted = numbered_loader(n=23, seed=1)
    served(interrupted)
    partial = iter(interrupted)
    first_two = [next(partial)[0].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_done": 2} and first_two == epochs[1][:2]

    resumed = numbered_loader(n=23, seed=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint taken before the next batch keeps it
    assert served(resumed) == epochs[1][2:]
    assert served(resumed) == epochs[2]


def test_state_saved_at_the_end_of_an_epoch_resumes_with_the_next():
    loader = numbered_loader(seed=2)
    served(loader)
    resumed = numbered_loader(seed=2)
    resumed.load_state_dict(loader.state_dict())
    assert served(resumed) == served(numbered_loader(seed=2, epoch_source=lambda: 1))


def test_epoch_source_overrides_a_stale_position():
    trainer_epoch = 4
    loader = numbered_loader(seed=2, epoch_source=lambda: trainer_epoch)
    loader.load_state_dict({"epoch": 3, "batches_done": 1})  # an epoch cut short, say
    assert sum(served(loader), []) == loader.epoch_indices(4).tolist()
    assert loader.state_dict() == {"epoch": 4, "batches_done": 3}


# --- resume inside Lightning's fit loop ------------------------------------------------------


class BatchRecorder(L.LightningModule):
    """A linear classifier that records, per step, a fingerprint of each example in its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.flatten(1).sum(1).round(decimals=3).tolist())
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_digits(folder: Path, ckpt_path: Path | None = None, **trainer_args) -> list:
    """Three epochs on digits, checkpointing after every step; the batches each step saw."""
    model = BatchRecorder()
    trainer = L.Trainer(
        default_root_dir=folder,
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(folder / "ckpts", "{step}", every_n_train_steps=1, save_top_k=-1)
        ],
        **trainer_args,
    )
    trainer.fit(model, datamodule=create_datamodule(data_cfg("digits"), 0), ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture(scope="module")
def uninterrupted_fit(tmp_path_factory):
    """fit_digits without interruption, once per limit_train_batches: (batches, checkpoints)."""
    runs = {}

    def run(limit_train_batches):
        if limit_train_batches not in runs:
            folder = tmp_path_factory.mktemp("uninterrupted")
            seen = fit_digits(folder, limit_train_batches=limit_train_batches)
            runs[limit_train_batches] = seen, folder / "ckpts"
        return runs[limit_train_batches]

    return run


@pytest.mark.parametrize(
    "limit_train_batches, resume_step",
    [(1.0, 5), (1.0, 11), (1.0, 16), (5, 5)],
    ids=["mid-epoch-0", "last-batch-of-epoch-0", "mid-epoch-1", "epoch-cut-by-limit"],
)
def test_lightning_resume_serves_the_batches_an_uninterrupted_run_would(
    uninterrupted_fit, tmp_path, limit_train_batches, resume_step
):
    # Digits has 1294 training examples: 11 batches of 128 per epoch.
    full_run, checkpoints = uninterrupted_fit(limit_train_batches)
    assert len(full_run) == 3 * (11 if limit_train_batches == 1.0 else limit_train_batches)
    checkpoint = checkpoints / f"step={resume_step}.ckpt"
    resumed_run = fit_digits(tmp_path, checkpoint, limit_train_batches=limit_train_batches)
    assert resumed_run == full_run[resume_step:]
