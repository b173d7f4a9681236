"""Each run's baseline (the usable sync run of its table and seed), the row's target accuracy,
per-seed numbers, means and paired differences."""

from __future__ import annotations

from mach_lightning.report.load import Run
from mach_lightning.report.metrics import PAIRED, final_val, run_values
from mach_lightning.report.rows import (
    BASELINE,
    MATCH_PREFIXES,
    TABLE_PREFIXES,
    Problem,
    Row,
    agreement,
    classify,
    differences,
    table_signature,
)
from mach_lightning.report.stats import paired_diff, summarize


def _no_baseline(run: Run, label: str, table_sig: tuple, all_runs: list[Run]) -> Problem:
    """Why a run has no baseline to be compared with, naming what differs."""
    syncs = [r for r in all_runs if r.topology == BASELINE]
    here = [r for r in syncs if table_signature(r) == table_sig]
    same_seed = [r for r in here if r.seed == run.seed]
    if same_seed:
        return Problem(
            "baseline unusable",
            run.source,
            label,
            f"the sync run of seed {run.seed} is not usable ({same_seed[0].source}: "
            f"{classify(same_seed[0]).detail if classify(same_seed[0]) else 'repeat'})",
        )
    elsewhere = [r for r in syncs if r.seed == run.seed]
    if elsewhere:
        closest = max(elsewhere, key=lambda r: sum(r.config.get(k) == v for k, v in table_sig))
        return Problem(
            "baseline mismatch",
            run.source,
            label,
            f"the sync run of seed {run.seed} ({closest.source}) has other data/model "
            f"settings: {differences(run, closest, TABLE_PREFIXES)}; not compared",
        )
    seeds = sorted({r.seed for r in here})
    detail = (
        f"no sync run with seed {run.seed} (baseline seeds: {', '.join(map(str, seeds))})"
        if seeds
        else "no sync run with these data and model settings"
    )
    return Problem("missing baseline", run.source, label, detail)


def pair_row(
    row: Row, baselines: list[Run], table_sig: tuple, all_runs: list[Run], problems: list[Problem]
) -> None:
    """Each run's baseline: the usable sync run of the table with its seed, best agreeing."""
    if row.is_baseline:
        row.baseline = {r.seed: r for r in row.runs}
        return
    for run in row.runs:
        same_seed = [b for b in baselines if b.seed == run.seed]
        if not same_seed:
            problems.append(_no_baseline(run, row.label, table_sig, all_runs))
            continue
        best = max(same_seed, key=lambda b: (agreement(run, b), b.mtime))
        row.baseline[run.seed] = best
        differs = differences(run, best, MATCH_PREFIXES)
        if differs:
            problems.append(
                Problem(
                    "baseline differs",
                    run.source,
                    row.label,
                    f"paired with {best.source}, which differs in {differs}",
                )
            )


def summarize_row(row: Row, target_acc: float | None, target_frac: float) -> None:
    """Targets, per-seed numbers, mean +/- std per column and paired differences."""
    base_runs = list({id(b): b for b in row.baseline.values()}.values())
    base_vals = [final_val(b) for b in base_runs if final_val(b) is not None]
    if target_acc is not None:
        row.target = target_acc
    elif base_vals:
        row.target = target_frac * sum(base_vals) / len(base_vals)
    row.values = {r.seed: run_values(r, row.target) for r in row.runs}
    keys = next(iter(row.values.values())).keys() if row.values else []
    row.cells = {k: summarize([v.get(k) for v in row.values.values()]) for k in keys}
    row.reached = sum(v["steps_to_target"] is not None for v in row.values.values())
    if row.is_baseline:
        return
    base_values = {s: run_values(b, None) for s, b in row.baseline.items()}
    for delta, key in PAIRED.items():
        row.deltas[delta] = paired_diff(
            {s: v[key] for s, v in row.values.items()}, {s: v[key] for s, v in base_values.items()}
        )
