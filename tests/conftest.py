"""Shared fixtures: real datasets from the machine, tiny fast run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mach_lightning.data  # noqa: F401  (load_config needs the registries: config imports neither)
import mach_lightning.methods  # noqa: F401
from mach_lightning.config import load_config

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Tests never reach W&B's servers and never prompt for a key.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def fit_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m mach_lightning.fit ARGS` from the repository root, output captured."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"} if env is None else env
    return subprocess.run(
        [sys.executable, "-m", "mach_lightning.fit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kwargs,
    )


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A few-second digits run writing under tmp_path, CSV logging only."""
    return [
        f"run.root={tmp_path / 'runs'}",
        "logger.wandb.enabled=false",
        "trainer.progress_bar=false",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        *extra,
    ]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str, config: str | None = None):
        return load_config(config, tiny_overrides(tmp_path, *extra))

    return make


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR}")
    return MNIST_DIR
