"""Checkpoints of a dist run: each component process saves its own; a resume starts them all from
the latest step every one of them saved.

A process saves `components/c<r>/ckpt/s<step>.pt` every `run.checkpoint_every_n_steps` batch
steps and at each epoch's end, keeping the last KEEP. Every process saves at the same steps, and
at a saved step no message is on the wire (lockstep: every step ends so; free mode first reads
every answer still coming and waits for its sends: `process.quiesce`), so what a process holds is
all there is: its weights, optimizer and scheduler states, its messages in flight and stored
forwards, the rule's in-flight state (replay buffers), its meters, the torch random state, the
data loader's position and how many rows its metrics.csv had. A lockstep run resumed from it
continues exactly as if never stopped (tests/test_dist.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mach_lightning.atomic import atomic_write
from mach_lightning.runs import csv_rows, truncate_metrics

KEEP = 2  # checkpoints kept per process: a process killed mid-save still has the one before
_NAME = re.compile(r"^s(\d+)\.pt$")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "ckpt"


def saved_steps(out_dir: Path) -> list[int]:
    folder = checkpoint_dir(out_dir)
    found = [_NAME.match(p.name) for p in folder.glob("s*.pt")] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def common_step(component_dirs: list[Path]) -> int | None:
    """The latest step every process saved (None: no such step)."""
    shared = set.intersection(*(set(saved_steps(d)) for d in component_dirs))
    return max(shared) if shared else None


def save(out_dir: Path, step: int, position: dict, parts) -> None:
    """This process's whole state at `step` (`parts`: a TrainingParts), written atomically."""
    parts.logger.save()  # the rows up to here on disk, so the count below is theirs
    state = {
        "step": step,
        "position": position,
        "weights": parts.own_state(),
        "optimizers": {j: parts.optimizers[j].state_dict() for j in parts.own_optimizers()},
        "schedulers": [s.state_dict() for s in parts.schedulers],
        "process": parts.process.state_dict(),
        "rule": parts.module.rule.state_dict(),
        "meter": dict(vars(parts.meter)),
        "node_meters": {n.index: dict(n.meter.sums) for n in parts.process.mine},
        "rng": torch.get_rng_state(),
        "csv_rows": csv_rows(out_dir),
    }
    folder = checkpoint_dir(out_dir)
    folder.mkdir(exist_ok=True)
    atomic_write(folder / f"s{step}.pt", lambda file: torch.save(state, file))
    for old in saved_steps(out_dir)[:-KEEP]:
        (folder / f"s{old}.pt").unlink(missing_ok=True)


def load(out_dir: Path, step: int, parts) -> dict:
    """Restore what `save` wrote at `step`; the metrics rows logged after it are dropped.
    Returns the data position to continue from."""
    state = torch.load(checkpoint_dir(out_dir) / f"s{step}.pt", weights_only=False)
    module = parts.module
    module.load_state_dict({**module.state_dict(), **state["weights"]})
    for j, saved in state["optimizers"].items():
        parts.optimizers[j].load_state_dict(saved)
    for scheduler, saved in zip(parts.schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    parts.process.load_state_dict(state["process"])
    module.rule.load_state_dict(state["rule"])
    vars(parts.meter).update(state["meter"])
    for node in parts.process.mine:
        node.meter.sums = dict(state["node_meters"].get(node.index, {}))
    torch.set_rng_state(state["rng"])
    truncate_metrics(out_dir, step, state["csv_rows"])
    return state["position"]
