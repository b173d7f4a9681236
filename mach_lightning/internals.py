"""The private parts of Lightning that mach_lightning relies on, each behind one switch.

A private attribute can change in any release, also within pyproject.toml's bounds, so one is used
only where it pays: at least 2% of a training step on `bench/overhead.py` against the public API.
Each switch below says what it buys, measured; `python bench/overhead.py --internals` measures it
again, each switch turned off against all on, side by side. Everything else uses the libraries'
public API (the internals measured and dropped are listed at the end).

A switch is a constant read once, at import: on, unless the environment variable
MACH_LIGHTNING_INTERNALS_OFF names it (comma-separated names, or `all`). When an upgrade breaks
one, tests/test_internals.py fails naming the Lightning version and the switch; with the switch
off, training takes the public path, which gives the same results, only slower. (Tests and the
benchmark flip the module attribute instead; the code reads it where it acts, not at import.)

This module imports nothing of mach_lightning: it is the lowest layer of pyproject.toml's
import contract, so any module may read it.
"""

from __future__ import annotations

import os

ENV = "MACH_LIGHTNING_INTERNALS_OFF"
SWITCHES = ("direct_metrics", "lean_step_count")


def switched_off(text: str) -> frozenset[str]:
    """The switches named in ENV's value; an unknown name is an error, not silently ignored."""
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    if "all" in names:
        return frozenset(SWITCHES)
    unknown = sorted(names - set(SWITCHES))
    if unknown:
        raise ValueError(
            f"{ENV}={text!r}: no switch named {', '.join(unknown)}; the switches are "
            f"{', '.join(SWITCHES)} (or all)."
        )
    return frozenset(names)


OFF = switched_off(os.environ.get(ENV, ""))

DIRECT_METRICS: bool = "direct_metrics" not in OFF
"""Training metrics go into `trainer.callback_metrics` and `trainer.progress_bar_metrics` by
writing into the dicts those properties return (Lightning's logger connector's own), where
callbacks (ModelCheckpoint, the progress bar), result.json and tests read them.
Public path: `self.log_dict(..., logger=False)`: 2.7-2.8 ms per log point of 6 keys against
0.15-0.17 ms. Buys (sync, MNIST batch 128, a log point every 20 steps): 126-133 us a step, 2.5-2.8%
of the benchmark's 4.8-5.4 ms step at its default settings (1.6-1.8% of a one-thread step); more
for a method that logs more keys. Used in sim/module.py (log_step_metrics)."""

LEAN_STEP_COUNT: bool = "lean_step_count" not in OFF
"""On the lean path (sim/lean_steps.py), a `DirectStep` steps the torch optimizer between
`LightningOptimizer._on_before_step` and `_on_after_step`, the callbacks Lightning's
manual-optimization loop installs on it every batch to count the step (`trainer.global_step`,
which checkpointing relies on) and time it for its profiler.
Public path: `LightningOptimizer.step`, through the strategy, the precision plugin and a round of
on_before_optimizer_step hooks that pass the call through: 67-97 us per optimizer step around
the torch step, against 8-15 us. Buys, K optimizer steps a batch: 81 us a step at K=1 (1.5% of
the benchmark's step at its default settings), 134 us at K=2 (2.8%), 238 us at K=4 (4.5%).
Used in sim/lean_steps.py (DirectStep)."""

# Measured and dropped for the public API (same benchmark; per step; % of a 4.8-5.4 ms step):
# - a `__setattr__` skipping nn.Module's checks for `_current_fx_name`, which Lightning sets
#   around every hook (26-32 times a batch, 1.4 us saved each): 37-48 us, 0.7-1.0%.
# - a precomputed `training_step.__signature__`, for the signature Lightning reads 1.2 times a
#   batch (8 us saved each): 9 us, 0.2%.
# - submitit's `_make_sbatch_string`, for the dry run's sbatch file: no training cost at all; the
#   dry run writes the lines itself from the parameters given to submitit's update_parameters.
# - OmegaConf's `_get_node`, to list a config's keys without resolving `???`: once per load; the
#   public `OmegaConf.to_container(..., throw_on_missing=False)` does it.
# - Lightning's `ExperimentWriter._check_log_dir_exists` (and `CSVLogger._experiment`), to append
#   to metrics.csv across resumes: once per run; runs.py's CSV logger is a public `Logger`.
