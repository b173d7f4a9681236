"""What the report reads from one run, and the per-row summaries built from those numbers.

Per run: final test accuracy (result.json, else the last logged `test/acc`), best and final
validation accuracy over the logged curve, mean wall-clock and simulated ms per batch step, peak
memory (`mem/peak_mb`), each component's own final test accuracy (`test/acc_c{i}`, for topologies
whose components work alone, e.g. MACH students), and the first step (and simulated parallel
time, `time/sim_elapsed_s` interpolated at that step) where `val/acc` reaches the row's target.
"""

from __future__ import annotations

from mach_lightning.report.load import Run
from mach_lightning.report.stats import first_reach, mean_of, value_at

# (key, column title, kind) in table order; kind picks the formatting.
COLUMNS = [
    ("final_test", "final test acc %", "acc"),
    ("component_test", "test acc per component % (min)", "components"),
    ("delta_final_test", "Δ final vs sync [95% CI]", "delta"),
    ("best_val", "best val acc %", "acc"),
    ("delta_best_val", "Δ best val vs sync [95% CI]", "delta"),
    ("steps_to_target", "steps to target", "reach"),
    ("sim_to_target", "sim. time to target (s)", "reach"),
    ("step_ms", "wall ms/step", "float"),
    ("sim_step_ms", "sim. ms/step", "float"),
    ("peak_mb", "peak MB", "int"),
]
PAIRED = {"delta_final_test": "final_test", "delta_best_val": "best_val"}
VAL, TEST, SIM = "val/acc", "test/acc", "time/sim_elapsed_s"


def final_val(run: Run) -> float | None:
    values = run.series(VAL)[1]
    return values[-1] if values else None


def run_values(run: Run, target: float | None) -> dict[str, float | None]:
    """The per-run numbers behind every column (None where the run did not log it)."""
    vals = run.series(VAL)[1]
    step_ms = [r["time/step_ms"] for r in run.history if "time/step_ms" in r]
    sim_ms = [r["time/sim_step_ms"] for r in run.history if "time/sim_step_ms" in r]
    out = {
        "final_test": run.last(TEST),
        "best_val": max(vals) if vals else None,
        "final_val": final_val(run),
        "step_ms": mean_of(step_ms) if step_ms else None,
        "sim_step_ms": mean_of(sim_ms) if sim_ms else None,
        "peak_mb": (run.result or {}).get("mem/peak_mb"),
        "steps_to_target": None,
        "sim_to_target": None,
    }
    components = component_accuracies(run)
    out.update({f"component_test_c{i}": acc for i, acc in components.items()})
    out["component_test"] = min(components.values()) if components else None
    if target is not None:
        steps, accs = run.series(VAL)
        reached = first_reach(steps, accs, target)
        out["steps_to_target"] = reached
        sim_steps, sim = run.series(SIM)
        if reached is not None and sim_steps:
            out["sim_to_target"] = value_at(sim_steps, sim, reached)
    return out


def component_accuracies(run: Run) -> dict[int, float]:
    """{i: final test/acc_c{i}} for every component the run reports on its own."""
    out, i = {}, 0
    while (value := run.last(f"{TEST}_c{i}")) is not None:
        out[i] = value
        i += 1
    return out


def has_sim_time(run: Run) -> bool:
    return any(SIM in r for r in run.history)
