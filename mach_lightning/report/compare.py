"""Group runs into tables and rows, pair each with its synchronous baseline, list the problems.

- Table: runs with the same data and model settings (`data.*`, `model.*`, minus where the files
  live and what their backbone does not read). Row: one topology and one setting: the settings
  that vary among that topology's runs in the table and that it reads (e.g. staleness.schedule,
  staleness.k, optim.lr), seeds pooled.
- Baseline of a run: the finished `sync` run of the same table (same data and model) and the same
  seed that agrees on the training budget and every other setting but the topology's own and the
  tuning keys (`keys.py`); among several, the one agreeing on most tuning keys.
- Never averaged in, listed under problems instead: runs without result.json (running, queued,
  failed, killed), diverged runs (a non-finite loss), runs whose baseline is missing or differs
  (their accuracy still shows, without a difference, the row saying why), repeated seeds, and
  unreadable runs (a config.yaml, result.json or metrics.csv that cannot be parsed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mach_lightning.report.keys import applies
from mach_lightning.report.load import Run
from mach_lightning.report.pairing import pair_row, summarize_row
from mach_lightning.report.rows import (
    BASELINE,
    Comparison,
    Problem,
    Row,
    Table,
    classify,
    table_signature,
)

__all__ = ["Comparison", "Problem", "Row", "Table", "compare"]


def _short(key: str) -> str:
    # delayed.* and local.* read as their method's settings (the labels of before they moved)
    short = ("staleness.", "topology.", "delayed.", "local.")
    if key.startswith("runtime.") and key != "runtime.name":  # mode=free beside runtime.name=dist
        return key.split(".", 1)[1]
    return key.split(".", 1)[1] if key.startswith(short) else key


def _value(run: Run, key: str) -> str:
    """The setting as rows tell it apart; one the run does not read is no value at all."""
    return repr(run.config.get(key)) if applies(key, run.config) else "(not read)"


FIRST = ("staleness.schedule", "runtime.name", "runtime.mode")  # they decide what the rest mean
RUNTIME_NAMED = ("runtime.name", "runtime.mode")


def _varying(runs: list[Run]) -> list[str]:
    """Settings that differ among these runs, those that decide what the rest mean first. A
    runtime detail (runtime.queue) counts only where it differs among the runs that read it: the
    runtime's name and mode already tell a real run from a simulated one."""
    names = {k for r in runs for k in r.config if applies(k, r.config)} - {"topology.name"}
    keys = sorted(names, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
    out = []
    for k in keys:
        readers = runs
        if k.startswith("runtime.") and k not in RUNTIME_NAMED:
            readers = [r for r in runs if applies(k, r.config)]
        if len({_value(r, k) for r in readers}) > 1:
            out.append(k)
    return out


def _title(signature: dict[str, Any], others: list[dict[str, Any]]) -> str:
    base = (
        f"{signature.get('data.name', '?')} · {signature.get('model.backbone', '?')} "
        f"K={signature.get('model.num_components', '?')}"
    )
    differing = sorted(
        {k for o in others for k in signature if k in o and o[k] != signature[k]}
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
            groups[tuple(_value(run, k) for k in keys)].append(run)
        for group in sorted(groups.values(), key=lambda g: _order(g[0], keys)):
            setting = {k: group[0].config.get(k) for k in keys}
            shown = {k: v for k, v in setting.items() if applies(k, group[0].config)}
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
    "unreadable",
    "missing baseline",
    "baseline mismatch",
    "baseline unusable",
    "baseline differs",
    "in progress",
    "state unknown",
    "failed",
    "diverged",
    "repeated seed",
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
        else:  # never started, or config.yaml unreadable: no settings to place it in a table
            problems.append(classify(run) or Problem("in progress", run.source, "?", ""))
            problems[-1].label = "(no config)" if run.state == "unreadable" else "(not started)"
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
