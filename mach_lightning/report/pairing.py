"""Each run's baseline, the row's target accuracy, per-seed numbers, means and paired differences.

The baseline of a run is a usable sync run of its table (same data and model) and seed that
agrees on every setting but the topology's own, the runtime and the tuning keys (`keys.py`: the
training budget above all); among several, one of the same runtime, then the one agreeing on
most tuning keys, then the newest. A run
without one keeps its own numbers but gets no difference; its row says why.
"""

from __future__ import annotations

from mach_lightning.report.keys import (
    budget_differences,
    describe,
    runtime_differences,
    table_differences,
    tuned_text,
    tuning_agreement,
    tuning_differences,
)
from mach_lightning.report.load import Run
from mach_lightning.report.metrics import PAIRED, final_val, run_values
from mach_lightning.report.rows import BASELINE, Problem, Row, classify, table_signature
from mach_lightning.report.stats import paired_diff, summarize


def _no_baseline(run: Run, label: str, table_sig: tuple, all_runs: list[Run]) -> tuple:
    """(the problem, the row's few words) for a run without a usable sync run of its seed in
    its table, naming what differs."""
    syncs = [r for r in all_runs if r.topology == BASELINE]
    here = [r for r in syncs if table_signature(r) == table_sig]
    same_seed = [r for r in here if r.seed == run.seed]
    if same_seed:
        why = classify(same_seed[0])
        short = f"the sync run of seed {run.seed} is not usable"
        detail = f"{short} ({same_seed[0].source}: {why.detail if why else 'repeat'})"
        return Problem("baseline unusable", run.source, label, detail), short
    elsewhere = [r for r in syncs if r.seed == run.seed and r.config]
    if elsewhere:
        closest = min(elsewhere, key=lambda r: len(table_differences(run.config, r.config)))
        differs = describe(
            table_differences(run.config, closest.config), run.config, closest.config
        )
        detail = (
            f"the sync run of seed {run.seed} ({closest.source}) has other data/model "
            f"settings: {differs}; not compared"
        )
        return Problem(
            "baseline mismatch", run.source, label, detail
        ), f"baseline differs in {differs}"
    seeds = sorted({r.seed for r in here})
    detail = (
        f"no sync run with seed {run.seed} (baseline seeds: {', '.join(map(str, seeds))})"
        if seeds
        else "no sync run with these data and model settings"
    )
    return Problem("missing baseline", run.source, label, detail), detail


def _pair_run(row: Row, run: Run, baselines: list[Run]) -> tuple | None:
    """Pair one run (filling row.baseline and row.tuned), or (the problem, the row's words)."""
    same_seed = [b for b in baselines if b.seed == run.seed]
    fit = [b for b in same_seed if not budget_differences(run.config, b.config)]
    if not fit:
        closest = min(same_seed, key=lambda b: len(budget_differences(run.config, b.config)))
        differs = budget_differences(run.config, closest.config)
        why = f"baseline differs in {describe(differs, run.config, closest.config)}"
        return Problem("baseline differs", run.source, row.label, f"{why}; not compared"), why
    best = max(fit, key=lambda b: (_agreement(run.config, b.config), b.mtime))
    row.baseline[run.seed] = best
    shown = runtime_differences(run.config, best.config)
    shown += tuning_differences(run.config, best.config)
    tuned = tuned_text(shown, run.config, best.config)
    if tuned and tuned not in row.tuned:
        row.tuned.append(tuned)
    return None


def _agreement(run: dict, base: dict) -> tuple[bool, int]:
    """The same runtime first (the sim sync run for a simulated one, the real one for a real
    one), then the most tuning keys alike."""
    return not runtime_differences(run, base), tuning_agreement(run, base)


def pair_row(
    row: Row, baselines: list[Run], table_sig: tuple, all_runs: list[Run], problems: list[Problem]
) -> None:
    """Each run's baseline (see the module's docstring); the runs without one are problems."""
    if row.is_baseline:
        row.baseline = {r.seed: r for r in row.runs}
        return
    for run in row.runs:
        if any(b.seed == run.seed for b in baselines):
            failed = _pair_run(row, run, baselines)
        else:
            failed = _no_baseline(run, row.label, table_sig, all_runs)
        if failed:
            problems.append(failed[0])
            row.unpaired.setdefault(failed[1], []).append(run.seed)


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
