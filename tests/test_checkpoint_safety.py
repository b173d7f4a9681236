"""Checkpoints load without running code from them (mach_lightning/checkpoint_io.py).

A crafted `.ckpt` whose pickle calls `os.system("touch MARKER")` when unpickled is refused, with
one clear sentence and no marker file, by the safe loader and by the export and fit CLIs; with
--trust-checkpoint it loads, with a warning, and the marker appears (the file really runs code).
Every topology's real checkpoints, last.ckpt and best-*.ckpt, load with weights_only=True.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from mach_lightning.checkpoint_io import CheckpointError, lightning_loading, load_checkpoint
from mach_lightning.config import ConfigError, load_config
from mach_lightning.fit import run_fit
from mach_lightning.launch.task import _checkpoint_step
from mach_lightning.methods import list_topologies
from mach_lightning.methods.mach_single import load_upstream

from .conftest import REPO, fit_cli, tiny_overrides

TINY = [
    "model.num_components=3",  # mach_single: an upstream of 2; every topology has work in flight
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.test_after_fit=false",
]
REFUSED = "holds objects that are not plain tensors and containers (posix.system)"


class Payload:
    """Unpickled, runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def craft(path: Path, marker: Path, checkpoint: dict | None = None) -> Path:
    """`checkpoint` (default: an empty one) with the payload added, saved to `path`."""
    torch.save({**(checkpoint or {"state_dict": {}}), "payload": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> the checkpoints folder of a tiny run of that topology (each trained once)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            tmp = tmp_path_factory.mktemp(name)
            cfg = load_config(None, tiny_overrides(tmp, f"topology.name={name}", *TINY))
            runs[name] = Path(run_fit(cfg)["run_dir"]) / "checkpoints"
        return runs[name]

    return get


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mach_lightning.export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )


def test_safe_loader_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    crafted = craft(tmp_path / "crafted.ckpt", marker)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(crafted)
    assert str(refused.value) == (
        f"{crafted}: {REFUSED}; load it only if you trust its source, with --trust-checkpoint."
    )
    assert not marker.exists()


def test_trusted_load_warns_and_runs_the_payload(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    loaded = load_checkpoint(craft(tmp_path / "crafted.ckpt", marker), trust=True)
    assert "warning: --trust-checkpoint" in capsys.readouterr().err
    assert marker.exists() and loaded["payload"] == 0  # os.system ran: the file is malicious


def test_export_refuses_a_crafted_checkpoint_and_trusts_it_only_when_told(tmp_path, trained):
    # A real, exportable MACH checkpoint with the payload added: only the flag makes it load.
    real = load_checkpoint(trained("mach_seq") / "last.ckpt")
    marker, out = tmp_path / "MARKER", tmp_path / "c0.pt"
    crafted = craft(tmp_path / "crafted.ckpt", marker, real)
    refused = export_cli("--ckpt", str(crafted), "--out", str(out))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"error: {crafted}: {REFUSED}")
    assert "--trust-checkpoint" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists() and not out.exists()

    trusted = export_cli("--ckpt", str(crafted), "--out", str(out), "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr
    assert "warning: --trust-checkpoint" in trusted.stderr
    assert marker.exists() and out.is_file()


@pytest.mark.parametrize("name", list_topologies())
def test_real_checkpoints_load_with_weights_only(name, trained):
    checkpoints = trained(name)
    paths = [checkpoints / "last.ckpt", *checkpoints.glob("best-*.ckpt")]
    assert len(paths) == 2  # last.ckpt and ModelCheckpoint's best
    for path in paths:
        checkpoint = load_checkpoint(path)
        assert checkpoint["topology_state"] and checkpoint["optimizer_states"]
        assert any(key.startswith("ModelCheckpoint") for key in checkpoint["callbacks"])
        with lightning_loading():  # what Trainer.fit/test(ckpt_path=..., weights_only=True) use
            assert TorchCheckpointIO().load_checkpoint(path, weights_only=True).keys() == (
                checkpoint.keys()
            )
    assert _checkpoint_step(checkpoints.parent) == 2  # launch's bookkeeping read, mmap'd


def test_launch_bookkeeping_does_not_unpickle_a_crafted_last_ckpt(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "checkpoints").mkdir()
    craft(tmp_path / "checkpoints" / "last.ckpt", marker)
    assert _checkpoint_step(tmp_path) is None  # run_fit then refuses it, where errors are logged
    assert not marker.exists()


def test_mach_single_refuses_a_crafted_upstream(tmp_path):
    marker = tmp_path / "MARKER"
    crafted = craft(tmp_path / "crafted.ckpt", marker)
    with pytest.raises(ConfigError, match=rf"mach.upstream_ckpt={crafted}: .*\(posix.system\)"):
        load_upstream(nn.ModuleList(), str(crafted))
    assert not marker.exists()


def _truncated(real: bytes) -> bytes:
    return real[: len(real) // 2]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda real: b"", id="empty"),
        pytest.param(lambda real: b"this is not a checkpoint\n" * 20, id="garbage"),
        pytest.param(_truncated, id="truncated"),
        pytest.param(lambda real: real[:100], id="zip-header-only"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(content, tmp_path, trained):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content((trained("sync") / "last.ckpt").read_bytes()))
    expected = f"{path}: not a PyTorch checkpoint (truncated or corrupt?)."
    for trust in (False, True):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, trust=trust)
        assert str(err.value) == expected


def test_export_names_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_text("this is not a checkpoint\n")
    refused = export_cli("--ckpt", str(path), "--out", str(tmp_path / "c0.pt"))
    expected = f"error: {path}: not a PyTorch checkpoint (truncated or corrupt?).\n"
    assert (refused.returncode, refused.stderr) == (2, expected)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.ckpt: cannot be read \(No such file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_fit_refuses_crafted_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    crafted = craft(tmp_path / "crafted.ckpt", marker)
    result = fit_cli(*tiny_overrides(tmp_path), f"ckpt_path={crafted}")
    assert result.returncode == 2, result.stderr
    assert "--trust-checkpoint" in result.stderr and REFUSED in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
