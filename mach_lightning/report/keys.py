"""Which settings count, and how, when a run is set against its synchronous baseline.

Every key of a run's resolved config (flattened: `optim.lr`) is one of:

- ignored (IGNORE): where files live, logging, devices, cadences that change no compared number.
- a table key (`data.*`, `model.*`): one table per distinct set; runs meet only in their table.
- the topology's own (OWN: `topology.*`, `staleness.*` and the method sections `delayed.*`,
  `local.*`, `synth.*`, `mach.*`): sync reads none of them; they are what a row compares (named
  in its label where they vary), never a reason to refuse a baseline.
- a tuning key (TUNING): may differ from the baseline's; the row shows it ("lr 5e-4 (sync 1e-3)").
- a runtime key (RUNTIME: `runtime.name`, `runtime.mode`, ...): who ran the same maths, the
  simulator or one process per component. It splits rows, so a real run and a simulated run of
  the same config sit side by side, and never refuses a baseline: a sync run of the same runtime
  is preferred, another is shown ("runtime dist (sync sim)").
- anything else (the training budget `trainer.max_epochs`, `trainer.max_steps`,
  `trainer.limit_train_batches`, precision, validation cadence, and any key added later): must
  equal the baseline's, or the run gets no difference; the row says which key differs.

A key the run does not read (`applies`) counts nowhere: `model.channels` of an MLP, `staleness.k`
under the pipeline schedule, `optim.momentum` under Adam, `synth.*` for sync.
"""

from __future__ import annotations

import math
from typing import Any

IGNORE = (
    "name",
    "seed",  # paired on, not compared
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
    "trainer.log_every_n_steps",  # logging cadence only
    "trainer.lean_steps",  # the same maths either way (tested bit for bit)
    "trainer.divergence_factor",  # only when to give up; a diverged run is never compared
    "trainer.test_after_fit",  # without a test there is no test difference to show anyway
    "runtime.timeout_s",  # when to give up on a silent process
    "runtime.host",
    "runtime.port",
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
OWN = ("topology.", "staleness.", "delayed.", "local.", "synth.", "mach.")
# The optimiser's hyperparameters are each method's own to tune: configs/dni.yaml halves the
# learning rate because early synthetic gradients are poor, and a sweep may search optim.lr per
# topology. The budget, data, model and seeds define the comparison; these only how each side
# spends it. Listed one by one so that a key added later is compared strictly until placed here.
TUNING = (
    "optim.name",
    "optim.lr",
    "optim.weight_decay",
    "optim.momentum",
    "optim.scheduler",
    "optim.step_size",
    "optim.gamma",
)
SHORT = {"optim.name": "optimizer", "runtime.name": "runtime"}
RUNTIME = ("runtime.",)

# Of the OWN keys, those each topology reads (from its source); a topology not listed reads them
# all, so a new one keeps every setting in its labels rather than pooling different ones.
_MACH = ("mach.grad_mode", "staleness.", "mach.use_student", "mach.target_weight")
_MACH += ("mach.student_weight", "mach.student_width", "mach.student_depth")
READS = {
    "sync": (),
    "delayed": ("delayed.", "staleness."),
    "local": ("local.", "staleness."),
    "dni": ("synth.", "staleness."),
    "cdni": ("synth.", "staleness."),
    "mach_seq": _MACH,
    "mach_kgraph": _MACH,
    "mach_single": (*_MACH, "mach.upstream_"),
}

# key -> (the setting that decides, its values under which the key is not read). Values not
# listed (a new backbone or schedule) keep the key: a wrong split beats a wrong pooling.
# (staleness.seed is not here: local's replay buffers draw from it under every schedule.)
_SCHEDULES = ("constant", "pipeline", "list", "uniform", "geometric", "straggler")
_SCHEDULE_READERS = {
    "staleness.k": ("constant",),
    "staleness.delays": ("list",),
    "staleness.cap": ("uniform", "geometric"),
    "staleness.p": ("geometric",),
    "staleness.straggler_component": ("straggler",),
    "staleness.straggler_factor": ("straggler",),
}
UNREAD_WHEN: dict[str, tuple[str, tuple]] = {
    key: ("staleness.schedule", tuple(s for s in _SCHEDULES if s not in readers))
    for key, readers in _SCHEDULE_READERS.items()
}
UNREAD_WHEN.update(
    {
        "model.width": ("model.backbone", ("cnn", "resnet")),
        "model.depth": ("model.backbone", ("cnn", "resnet")),
        "model.embedding_dim": ("model.backbone", ("cnn", "resnet")),
        "model.channels": ("model.backbone", ("mlp",)),
        "optim.momentum": ("optim.name", ("adam", "adamw")),
        "optim.step_size": ("optim.scheduler", ("none", "cosine")),
        "optim.gamma": ("optim.scheduler", ("none", "cosine")),
        "local.aux_hidden": ("local.aux_head", ("linear",)),
        "runtime.mode": ("runtime.name", ("sim",)),  # the simulator has one mode
        "runtime.queue": ("runtime.mode", ("lockstep",)),  # free mode's only
        "runtime.sleep_ms": ("runtime.name", ("sim",)),
    }
)


def ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORE)


def applies(key: str, config: dict[str, Any]) -> bool:
    """Whether a run with this config reads the setting (and it is not an ignored one)."""
    if ignored(key):
        return False
    reads = READS.get(str(config.get("topology.name")))
    if key.startswith(OWN) and key != "topology.name" and reads is not None:
        if not key.startswith(reads):
            return False
    rule = UNREAD_WHEN.get(key)
    return rule is None or config.get(rule[0]) not in rule[1]


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    # A key only one side has comes from an older or newer schema (or a W&B config cut down):
    # its value on the other side is unknown, not different.
    keys = set(a) & set(b)
    return sorted(
        k for k in keys if (applies(k, a) or applies(k, b)) and repr(a.get(k)) != repr(b.get(k))
    )


def budget_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys that must agree for a difference to mean anything, and do not."""
    return [
        k
        for k in _differing(a, b)
        if not k.startswith(OWN) and not k.startswith(RUNTIME) and k not in TUNING
    ]


def table_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in _differing(a, b) if k.startswith(TABLE_PREFIXES)]


def tuning_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in _differing(a, b) if k in TUNING]


def tuning_agreement(a: dict[str, Any], b: dict[str, Any]) -> int:
    return sum(repr(a.get(k)) == repr(b.get(k)) for k in TUNING if k in a or k in b)


def runtime_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = [k for k in _differing(a, b) if k.startswith(RUNTIME)]
    return sorted(keys, key=lambda k: (k != "runtime.name", k))  # the runtime, then its mode


def short_value(value: Any) -> str:
    """5e-4 rather than 0.0005: learning rates read as they are written in configs."""
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 0.01:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(keys: list[str], a: dict[str, Any], b: dict[str, Any]) -> str:
    """'trainer.max_epochs (20 vs 4), trainer.max_steps (-1 vs 40)': a's value, then b's."""
    return ", ".join(f"{k} ({short_value(a.get(k))} vs {short_value(b.get(k))})" for k in keys)


def tuned_text(keys: list[str], run: dict[str, Any], base: dict[str, Any]) -> str:
    """'lr 5e-4 (sync 1e-3), scheduler none (sync cosine)'."""
    parts = []
    for k in keys:
        name = SHORT.get(k, k.split(".", 1)[1])
        parts.append(f"{name} {short_value(run.get(k))} (sync {short_value(base.get(k))})")
    return ", ".join(parts)
