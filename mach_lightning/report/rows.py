"""The report's data: problems, rows, tables; which settings count, and which runs are unusable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mach_lightning.report.keys import TABLE_PREFIXES, applies
from mach_lightning.report.load import DIVERGED, Run
from mach_lightning.report.stats import PairedDiff, Summary

BASELINE = "sync"


@dataclass
class Problem:
    kind: str  # unreadable | in progress | failed | diverged | missing baseline | ...
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
    tuned: list[str] = field(default_factory=list)  # tuning keys that differ from the baseline
    unpaired: dict[str, list[int]] = field(default_factory=dict)  # why no difference -> seeds

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


def table_signature(run: Run) -> tuple:
    return tuple(
        sorted(
            (k, v)
            for k, v in run.config.items()
            if k.startswith(TABLE_PREFIXES) and applies(k, run.config)
        )
    )


def classify(run: Run) -> Problem | None:
    """The problem that keeps this run out of every mean, or None."""
    label = run.topology
    if run.state == "unreadable":  # a file of the run cannot be parsed: named in the detail
        return Problem("unreadable", run.source, label, run.detail)
    if run.state == "unknown":  # squeue did not answer: neither in progress nor failed, as known
        return Problem("state unknown", run.source, label, run.detail)
    if run.state == DIVERGED:  # stopped by fit's divergence watch: result.json says why
        return Problem("diverged", run.source, label, run.detail)
    if not run.finished:
        kind = "failed" if run.state in ("failed", "crashed", "lost", "killed") else "in progress"
        return Problem(kind, run.source, label, run.detail or f"W&B state: {run.state}")
    bad = run.nonfinite()
    if bad:
        return Problem("diverged", run.source, label, f"non-finite {', '.join(bad)}")
    return None
