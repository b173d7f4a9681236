"""Files that are either whole or absent: write to a temporary file beside the target, then rename.

A crash, a kill or a full disk in the middle of a write leaves the previous version of the file in
place (a rename within one folder is atomic on POSIX), never a truncated one that later fails to
load. A full disk becomes a `DiskFullError` that says so, naming the file that was kept.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class DiskFullError(OSError):
    """No space left while writing a run's file; the previous version of the file is kept."""


def _disk_full(path: Path) -> DiskFullError:
    kept = "the previous version is kept" if path.exists() else "nothing was written"
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while writing {path} ({kept}). Free space on {path.parent} (or move "
        f"run.root elsewhere) and resume with resume=true",
    )


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err.errno == errno.ENOSPC:
            raise _disk_full(path) from None
        raise
    except BaseException:  # a kill signal turned exception, KeyboardInterrupt: no stray tmp file
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through `atomic_write`: last.ckpt is the previous good
    checkpoint until the new one is complete on disk. The checkpoint is serialised in memory
    first, so a full disk costs nothing but the failed write."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda file: file.write(buffer.getbuffer()))
