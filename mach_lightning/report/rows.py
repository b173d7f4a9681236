"""The report's data: problems, rows, tables; which settings count, and which runs are unusable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mach_lightning.report.load import Run
from mach_lightning.report.stats import PairedDiff, Summary

BASELINE = "sync"
IGNORE = (
    "name",
    "seed",
    "resume",
    "ckpt_path",
    "run.",
    "logger.",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.progress_bar",
    "trainer.deterministic",
    "data.root",
    "data.download",
    "data.verify",
    "data.eval_batch_size",
    "simtime.",
    "diagnostics.",
    "config.",
    "input_shape",
    "num_classes",
)
TABLE_PREFIXES = ("data.", "model.")
MATCH_PREFIXES = ("optim.", "trainer.")


@dataclass
class Problem:
    kind: str  # in progress | failed | diverged | missing baseline | baseline mismatch | ...
    run: str
    label: str
    detail: str


@dataclass
class Row:
    label: str
    topology: str
    setting: dict[str, Any]
    runs: list[Run] = field(default_factory=list)  # finished, finite, one per seed
    excluded: int = 0  # runs of this row listed under problems instead
    baseline: dict[int, Run] = field(default_factory=dict)  # seed -> its baseline run
    target: float | None = None
    values: dict[int, dict[str, float | None]] = field(default_factory=dict)  # seed -> numbers
    cells: dict[str, Summary | None] = field(default_factory=dict)
    deltas: dict[str, PairedDiff | None] = field(default_factory=dict)
    reached: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.topology == BASELINE

    @property
    def marked(self) -> bool:
        return any(d is not None and d.excludes_zero for d in self.deltas.values())


@dataclass
class Table:
    title: str
    signature: dict[str, Any]
    rows: list[Row]
    target_note: str = ""


@dataclass
class Comparison:
    tables: list[Table]
    problems: list[Problem]
    runs: list[Run]


def ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORE)


def table_signature(run: Run) -> tuple:
    return tuple(
        sorted(
            (k, v) for k, v in run.config.items() if k.startswith(TABLE_PREFIXES) and not ignored(k)
        )
    )


def classify(run: Run) -> Problem | None:
    """The problem that keeps this run out of every mean, or None."""
    label = run.topology
    if not run.finished:
        kind = "failed" if run.state in ("failed", "crashed", "lost", "killed") else "in progress"
        return Problem(kind, run.source, label, run.detail or f"W&B state: {run.state}")
    bad = run.nonfinite()
    if bad:
        return Problem("diverged", run.source, label, f"non-finite {', '.join(bad)}")
    return None


def agreement(a: Run, b: Run) -> int:
    keys = {k for k in a.config if k.startswith(MATCH_PREFIXES) and not ignored(k)}
    return sum(a.config.get(k) == b.config.get(k) for k in keys)


def differences(a: Run, b: Run, prefixes: tuple) -> str:
    keys = sorted(
        k
        for k in set(a.config) | set(b.config)
        if k.startswith(prefixes) and not ignored(k) and a.config.get(k) != b.config.get(k)
    )
    return ", ".join(f"{k} {a.config.get(k)} vs {b.config.get(k)}" for k in keys)
