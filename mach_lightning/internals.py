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
Public path: `self.log_dict(..., logger=False)`, about 0.5 ms per logged key against 0.03 ms.
Buys (sync, MNIST batch 128, one log point every 20 steps): 130-166 us a step, 2.7-3.3% of the
step at the benchmark's default settings (1.8-2.3% on one thread); more for a method that logs
more keys per log point. Used in sim/module.py (log_step_metrics)."""

LEAN_STEP_COUNT: bool = "lean_step_count" not in OFF
"""On the lean path (sim/lean_steps.py), a `DirectStep` steps the torch optimizer between
`LightningOptimizer._on_before_step` and `_on_after_step`, the callbacks Lightning's
manual-optimization loop installs on it every batch to count the step (`trainer.global_step`,
which checkpointing relies on) and time it for its profiler.
Public path: `LightningOptimizer.step`, through the strategy, the precision plugin and a round of
on_before_optimizer_step hooks that pass the call through.
Buys: 48-78 us per optimizer step, K per batch: 1.0% of the step at K=1, 3.2% at K=2, 5.9% at
K=4 at the benchmark's default settings (0.6%, 1.6%, 3.0% on one thread). Used in
sim/lean_steps.py (DirectStep)."""

# Measured and dropped for the public API (same benchmark; per step, 2-thread default settings):
# - `__setattr__` skipping nn.Module's checks for `_current_fx_name`, which Lightning sets around
#   every hook (26-32 times a batch): 37-48 us, 0.8-1.0%. nn.Module.__setattr__ now.
# - a precomputed `training_step.__signature__` for the signature Lightning reads each batch
#   (1.2 reads a batch): 9 us, 0.2%. inspect reads it.
# - submitit's `_make_sbatch_string` for the dry run's sbatch file: no training cost at all; the
#   dry run writes the lines from the parameters given to submitit's public update_parameters.
