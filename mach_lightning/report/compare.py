"""Group runs into tables and rows, pair each with its synchronous baseline, list the problems.

- Table: runs with the same data and model settings (`data.*`, `model.*`, minus where the files
  live). Row: one topology and one setting: the settings that vary among that topology's runs in
  the table (e.g. staleness.schedule, staleness.k, optim.lr), seeds pooled.
- Baseline of a run: the finished `sync` run of the same table (same data and model) and the same
  seed; among several, the one agreeing on most `optim.*` / `trainer.*` settings.
- Never averaged in, listed under problems instead: runs without result.json (running, queued,
  failed, killed), diverged runs (a non-finite loss), runs whose baseline is missing or has other
  data/model settings (their accuracy still shows, without a difference), and repeated seeds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mach_lightning.report.load import Run
from mach_lightning.report.pairing import pair_row, summarize_row
from mach_lightning.report.rows import (
    BASELINE,
    Comparison,
    Problem,
    Row,
    Table,
    classify,
    ignored,
    table_signature,
)

__all__ = ["Comparison", "Problem", "Row", "Table", "compare"]


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("staleness.", "topology.")) else key


# Staleness settings read by one schedule only (configs/default.yaml): left out of row labels
# under the other schedules, e.g. "delayed, schedule=pipeline" rather than "..., k=1".
SCHEDULE_KEYS = {
    "staleness.k": ("constant",),
    "staleness.delays": ("list",),
    "staleness.cap": ("uniform", "geometric"),
    "staleness.p": ("geometric",),
    "staleness.straggler_component": ("straggler",),
    "staleness.straggler_factor": ("straggler",),
}


def _relevant(key: str, config: dict[str, Any]) -> bool:
    schedules = SCHEDULE_KEYS.get(key)
    return schedules is None or config.get("staleness.schedule") in schedules


def _varying(runs: list[Run]) -> list[str]:
    """Settings that differ among these runs; the schedule first (it decides what the rest mean)."""
    names = {k for r in runs for k in r.config if not ignored(k)} - {"topology.name"}
    keys = sorted(names, key=lambda k: (k != "staleness.schedule", k))
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def _title(signature: dict[str, Any], others: list[dict[str, Any]]) -> str:
    base = (
        f"{signature.get('data.name', '?')} · {signature.get('model.backbone', '?')} "
        f"K={signature.get('model.num_components', '?')}"
    )
    differing = sorted(
        {k for o in others for k in signature if o.get(k) != signature.get(k)}
        - {"data.name", "model.backbone", "model.num_components"}
    )
    return base + "".join(f", {k.split('.', 1)[1]}={signature[k]}" for k in differing)


def _order(run: Run, keys: list[str]) -> tuple:
    """Sort rows by their settings, numbers as numbers (k=2 before k=10)."""
    values = [run.config.get(k) for k in keys]
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, repr(v)) for v in values)


def build_rows(runs: list[Run], problems: list[Problem]) -> list[Row]:
    """Rows of one table: topology x varying settings; problem runs counted, not used."""
    by_topology: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_topology[run.topology].append(run)
    rows = []
    for topology in sorted(by_topology, key=lambda t: (t != BASELINE, t)):
        members = by_topology[topology]
        keys = _varying(members)
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for run in members:
            groups[tuple(repr(run.config.get(k)) for k in keys)].append(run)
        for group in sorted(groups.values(), key=lambda g: _order(g[0], keys)):
            setting = {k: group[0].config.get(k) for k in keys}
            shown = {k: v for k, v in setting.items() if _relevant(k, group[0].config)}
            label = topology + "".join(f", {_short(k)}={v}" for k, v in shown.items())
            rows.append(_fill_row(Row(label, topology, setting), group, problems))
    return rows


def _fill_row(row: Row, group: list[Run], problems: list[Problem]) -> Row:
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in group:
        problem = classify(run)
        if problem:
            problem.label = row.label
            problems.append(problem)
            row.excluded += 1
        else:
            by_seed[run.seed].append(run)
    for seed, same in sorted(by_seed.items()):
        same.sort(key=lambda r: r.mtime)
        row.runs.append(same[-1])
        for older in same[:-1]:
            problems.append(
                Problem(
                    "repeated seed",
                    older.source,
                    row.label,
                    f"seed {seed} also in {same[-1].source} (the newer one is used)",
                )
            )
            row.excluded += 1
    return row


KIND_ORDER = [
    "missing baseline",
    "baseline mismatch",
    "baseline unusable",
    "in progress",
    "failed",
    "diverged",
    "repeated seed",
    "baseline differs",
]


def compare(
    runs: list[Run], target_acc: float | None = None, target_frac: float = 0.99
) -> Comparison:
    """Tables (one per data/model setting) and problems for a set of runs."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    problems: list[Problem] = []
    for run in runs:
        if run.config:
            groups[table_signature(run)].append(run)
        else:  # submitted, never started: no config to place it in a table
            problems.append(classify(run) or Problem("in progress", run.source, "?", ""))
            problems[-1].label = "(not started)"
    signatures = [dict(sig) for sig in groups]
    tables = []
    for sig, members in groups.items():
        rows = build_rows(members, problems)
        baselines = [r for row in rows if row.is_baseline for r in row.runs]
        for row in rows:
            pair_row(row, baselines, sig, runs, problems)
            summarize_row(row, target_acc, target_frac)
        note = (
            "the given target (--target-acc)"
            if target_acc is not None
            else f"{100 * target_frac:g}% of the matched sync baseline's final val acc"
        )
        tables.append(Table(_title(dict(sig), signatures), dict(sig), rows, note))
    tables.sort(key=lambda t: t.title)
    problems.sort(
        key=lambda p: (KIND_ORDER.index(p.kind) if p.kind in KIND_ORDER else 99, p.label, p.run)
    )
    return Comparison(tables, problems, runs)
