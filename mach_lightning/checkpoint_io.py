"""Loading checkpoints without running code from them.

A `.ckpt` is a pickle, and a full unpickling (`torch.load(..., weights_only=False)`) calls whatever
the file names: a crafted checkpoint given to `fit ckpt_path=...` or `export --ckpt` could run
`os.system`. So every checkpoint is loaded with `weights_only=True`, which only rebuilds tensors,
containers and primitives (plus the globals allowed in SAFE_GLOBALS), and a file that needs more is
refused with a `CheckpointError` naming it. `--trust-checkpoint` (trust=True) is the way around,
for files from a source you trust; it prints a warning.

  load_checkpoint(path, trust=...)    our own loads (resume bookkeeping, export, upstream weights)
  with lightning_loading(trust):      around trainer.fit/test(ckpt_path=p, weights_only=not trust)
"""

from __future__ import annotations

import contextlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

# Globals beyond torch's own weights_only allowlist that our checkpoints need: none, as of torch
# 2.13 and Lightning 2.6.6. A real checkpoint of every topology (tests/test_checkpoint_safety.py;
# by hand also with schedulers, sgd/adamw, DC-ASGD, random staleness schedules, replay buffers,
# bf16/16-mixed) holds only tensors, dicts, lists, tuples, strings and numbers: in our
# `topology_state` (queues, clocks, histograms), in Lightning's loops and callback states
# (ModelCheckpoint's best scores are tensors, its paths strings) and in `hyper_parameters`
# (Lightning saves dict(hparams), ours are plain containers). Add a class here only when that test
# names one, with the reason beside it; both loading paths below allow what is listed.
SAFE_GLOBALS: list[Any] = []

CORRUPT = "not a PyTorch checkpoint (truncated or corrupt?)"
TRUST_HINT = "load it only if you trust its source, with --trust-checkpoint"

_warned: set[str] = set()


class CheckpointError(ValueError):
    """A refused checkpoint, in one sentence: `path`, then `reason` (what is wrong with it)."""

    def __init__(self, path: str | Path, reason: str, hint: str = ""):
        super().__init__(f"{path}: {reason}{'; ' + hint if hint else ''}.")
        self.path, self.reason = str(path), reason


def load_checkpoint(
    path: str | Path, *, trust: bool = False, map_location: Any = "cpu", mmap: bool = False
) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True (trust=False) or fully (trust=True).

    mmap=True leaves the tensors on disk, for reading only the bookkeeping of a large file.
    Raises CheckpointError for a missing, unreadable or corrupt file, or (without trust) one that
    holds objects other than tensors and containers.
    """
    if trust:
        _warn_trusted(path)
    try:
        with lightning_loading(trust):
            return torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        if trust:  # a full unpickling fails like this only on a broken file
            raise CheckpointError(path, CORRUPT) from None
        reason = f"holds objects that are not plain tensors and containers ({_refused(path, err)})"
        raise CheckpointError(path, reason, TRUST_HINT) from None
    except Exception:  # torch's loader fails on garbage with EOFError, IndexError, RuntimeError...
        raise CheckpointError(path, CORRUPT) from None


def lightning_loading(trust: bool = False) -> contextlib.AbstractContextManager:
    """Around `trainer.fit/test(..., ckpt_path=p, weights_only=not trust)`: Lightning's own
    torch.load then allows SAFE_GLOBALS too. (With trust it unpickles fully; nothing to allow.)"""
    if trust:
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(SAFE_GLOBALS)


def _refused(path: str | Path, err: Exception) -> str:
    """The globals torch refused: read off the archive, or off its message (a non-zip pickle)."""
    names: list[str] = []
    with contextlib.suppress(Exception), lightning_loading():
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    names = names or re.findall(r"GLOBAL (\S+)", str(err))
    return ", ".join(dict.fromkeys(names)) or "pickle instructions torch refuses"


def _warn_trusted(path: str | Path) -> None:
    """One line on stderr per file: printed, not warnings.warn, so it survives warning filters."""
    if str(path) in _warned:
        return
    _warned.add(str(path))
    print(
        f"warning: --trust-checkpoint: loading {path} with full unpickling, which runs any code "
        f"the file holds; do this only for files from a source you trust",
        file=sys.stderr,
    )
