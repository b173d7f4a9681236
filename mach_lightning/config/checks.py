"""Checks of a merged config's section values: numbers in range and keys that depend on each
other (staleness schedules, the delayed and local sections, synthesizers, MACH), each naming the
key and the fix. A method's section is checked only when composed in (registered).
`mach_lightning/config/__init__.py` runs them from `validate_semantics` and re-exports them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig


class ConfigError(ValueError):
    """A configuration problem, explained in one paragraph that names the key, source and fix."""


def validate_staleness(cfg: DictConfig) -> None:
    """Staleness schedule, stale-gradient topology, diagnostics and simulated-time settings."""
    s, k = cfg.staleness, cfg.model.num_components
    if s.k < 0 or s.cap < 0:
        raise ConfigError(f"staleness.k and staleness.cap must be >= 0 (got {s.k}, {s.cap}).")
    if s.schedule == "list" and (len(s.delays) != k or min(s.delays, default=0) < 0):
        raise ConfigError(
            f"staleness.schedule=list needs staleness.delays with one delay >= 0 per component "
            f"(model.num_components={k}), got {list(s.delays)}; e.g. staleness.delays=[2,1,0]."
        )
    if not 0.0 < s.p <= 1.0:
        raise ConfigError(f"staleness.p must lie in (0, 1], got {s.p}.")
    if s.schedule == "straggler" and not 0 <= s.straggler_component < k:
        raise ConfigError(
            f"staleness.straggler_component={s.straggler_component} is not a component index; "
            f"use 0..{k - 1} (model.num_components={k})."
        )
    if s.straggler_factor < 1.0:
        raise ConfigError(f"staleness.straggler_factor must be >= 1, got {s.straggler_factor}.")
    validate_stale_sections(cfg)
    if cfg.diagnostics.cosine_every_n_steps < 0:
        raise ConfigError("diagnostics.cosine_every_n_steps must be >= 0 (0 turns it off).")
    validate_simtime(cfg.simtime)


def validate_stale_sections(cfg: DictConfig) -> None:
    """The delayed and local sections, where registered (a method's section is composed in only
    when its method is imported)."""
    if "delayed" in cfg and cfg.delayed.dcasgd_lambda < 0:
        raise ConfigError(
            f"delayed.dcasgd_lambda must be >= 0 (0: the plain optimizer), "
            f"got {cfg.delayed.dcasgd_lambda}."
        )
    if "local" in cfg and (cfg.local.async_buffer < 0 or cfg.local.aux_hidden < 1):
        raise ConfigError(
            f"local.async_buffer must be >= 0 (0: off) and local.aux_hidden >= 1, got "
            f"{cfg.local.async_buffer} and {cfg.local.aux_hidden}."
        )


SIM_COSTS = ("measured", "flops")


def validate_simtime(sim: DictConfig) -> None:
    """Simulated-time settings (sim/simtime.py)."""
    if sim.cost not in SIM_COSTS:
        raise ConfigError(f"simtime.cost must be one of {', '.join(SIM_COSTS)}, got {sim.cost}.")
    if sim.measure_reps < 1 or sim.measure_threads < 0:
        raise ConfigError(
            "simtime.measure_reps must be >= 1 and simtime.measure_threads >= 0 "
            "(0: training's thread count)."
        )
    if sim.remeasure_every_n_steps < 0 or sim.flops_per_s <= 0:
        raise ConfigError(
            "simtime.remeasure_every_n_steps must be >= 0 (0: measure once) and "
            "simtime.flops_per_s > 0."
        )
    if sim.link_latency_us < 0 or sim.link_bandwidth_gbs <= 0:
        raise ConfigError(
            "simtime.link_latency_us must be >= 0 and simtime.link_bandwidth_gbs > 0."
        )


STUDENT_MODES = ("neighbour", "student", "both")


def resolve_student_modes(use_student: Any, num_components: int) -> list[str]:
    """mach.use_student as one mode per component: a single value applies to every component."""
    is_list = isinstance(use_student, (list, tuple, ListConfig))
    values = list(use_student) if is_list else [use_student]
    modes = [
        {True: "student", False: "neighbour"}.get(v, v) if isinstance(v, bool) else v
        for v in values
    ]
    if len(modes) == 1:
        modes = modes * num_components
    if len(modes) != num_components or any(m not in STUDENT_MODES for m in modes):
        raise ConfigError(
            f"mach.use_student={use_student} must be one of {', '.join(STUDENT_MODES)} (or "
            f"true/false), or a list with one per component (model.num_components={num_components})"
            f", e.g. mach.use_student=[both,neighbour]."
        )
    return modes


def validate_synth_and_mach(cfg: DictConfig) -> None:
    """Synthesizer (dni, cdni) and MACH settings, where their sections are registered."""
    if "synth" in cfg:
        synth = cfg.synth
        if synth.hidden < 1 or synth.layers < 0 or synth.warmup_steps < 0:
            raise ConfigError(
                "synth.hidden must be >= 1, synth.layers and synth.warmup_steps >= 0."
            )
        if synth.lr <= 0 or synth.scale <= 0:
            raise ConfigError(
                f"synth.lr and synth.scale must be positive (got {synth.lr}, {synth.scale})."
            )
    if "mach" not in cfg:
        return
    mach = cfg.mach
    if mach.target_weight < 0 or mach.student_weight < 0:
        raise ConfigError("mach.target_weight and mach.student_weight must be >= 0.")
    if mach.student_width < 1 or mach.student_depth < 0:
        raise ConfigError("mach.student_width must be >= 1 and mach.student_depth >= 0.")
    resolve_student_modes(mach.use_student, cfg.model.num_components)


# the rules with `free = True` (a test checks)
FREE_METHODS = (
    "sync", "delayed", "local", "dni", "cdni", "mach_single", "mach_seq", "mach_kgraph",
)  # fmt: skip


def validate_free(cfg: DictConfig) -> None:
    """runtime.mode=free: a method that has a free mode, a queue, a budget."""
    r, name = cfg.runtime, cfg.topology.name
    if name not in FREE_METHODS:
        raise ConfigError(
            f"runtime.mode=free runs {', '.join(FREE_METHODS)} so far; topology.name={name} "
            "runs in dist with runtime.mode=lockstep (or in the simulator)."
        )
    if int(r.queue) < 1:
        raise ConfigError(f"runtime.queue must be at least 1 send in flight, got {r.queue}.")
    if int(cfg.trainer.max_steps) <= 0 and int(cfg.trainer.max_epochs) <= 0:
        raise ConfigError("runtime.mode=free needs trainer.max_steps or trainer.max_epochs set.")


def validate_runtime(cfg: DictConfig) -> None:
    """runtime.name=dist: one CPU process per component in lockstep, at full precision."""
    r, t = cfg.runtime, cfg.trainer
    if r.timeout_s <= 0:
        raise ConfigError(f"runtime.timeout_s must be positive seconds, got {r.timeout_s}.")
    oracle = r.get("synthesizer", "component") == "oracle"
    if oracle and cfg.topology.name not in ("dni", "cdni"):
        raise ConfigError(
            f"runtime.synthesizer=oracle gives DNI's gradient synthesizers processes of their "
            f"own; topology.name={cfg.topology.name} has none: use topology.name=dni or cdni, "
            "or drop runtime.synthesizer."
        )
    if r.name != "dist":
        return
    if r.mode == "free":
        validate_free(cfg)
    k = int(cfg.model.num_components)
    processes = 2 * k - 1 if oracle else k  # the oracle's: one per boundary besides
    if len(r.sleep_ms) > processes:
        raise ConfigError(
            f"runtime.sleep_ms has {len(r.sleep_ms)} entries for {processes} processes: give "
            "one per process (or fewer)."
        )
    if any(float(ms) < 0 for ms in r.sleep_ms):
        raise ConfigError(f"runtime.sleep_ms are milliseconds per step (>= 0), got {r.sleep_ms}.")
    wrong = {
        "trainer.accelerator": (t.accelerator, ("auto", "cpu")),
        "trainer.devices": (t.devices, ("auto", 1)),
        "trainer.num_nodes": (t.num_nodes, (1,)),
        "trainer.strategy": (t.strategy, ("auto",)),
        "trainer.precision": (str(t.precision), ("32-true", "32")),
    }
    for key, (value, allowed) in wrong.items():
        if value not in allowed:
            raise ConfigError(
                f"runtime.name=dist runs one CPU process per component (gloo) at full precision; "
                f"{key}={value} is for the simulator: drop it or set {key}={allowed[0]}."
            )
