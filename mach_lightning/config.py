"""Structured configuration: the schema (dataclasses), loading and validation.

A run's config is built in layers, each later one winning:
  schema defaults -> configs/default.yaml -> the experiment file (--config) -> key=value overrides.
Every layer is validated as it is merged, so an unknown key, a wrong type or a bad choice stops the
run before any work, with a message naming the key, the layer it came from and the valid choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


@dataclass
class ModelConfig:
    backbone: str = "mlp"  # mlp | cnn | resnet
    num_components: int = 1  # K: the backbone is split into K components
    width: int = 512  # MLP hidden width
    depth: int = 2  # MLP hidden layers before the embedding layer
    embedding_dim: int = 128  # width of the last hidden layer (the embedding)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # CNN/ResNet stage widths


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine | step
    step_size: int = 10  # epochs between decays for scheduler=step
    gamma: float = 0.1  # decay factor for scheduler=step


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion_mnist | cifar10
    root: str = "data"  # folder holding the dataset files
    batch_size: int = 128
    eval_batch_size: int = 1024
    val_fraction: float = 0.1  # share of the training set held out for validation
    normalize: bool = True  # standardise with the training set's mean and std
    download: bool = True  # download missing files when a network is reachable
    verify: bool = True  # check file checksums before use


@dataclass
class TopologyConfig:
    name: str = "sync"  # a registered topology: see `python -m mach_lightning.fit --list`
    # --- stale-gradient topologies (delayed, local); other topologies ignore these ---
    grad_mode: str = "stash"  # delayed: stash (forward-time weights) | recompute (current ones)
    dcasgd_lambda: float = 0.0  # delayed: DC-ASGD delay compensation strength; 0 = plain optimizer
    dcasgd_lr_scaling: bool = False  # delayed: divide the lr by the applied staleness (SA-ASGD)
    aux_head: str = "linear"  # local: auxiliary classifier per component: linear | mlp
    aux_hidden: int = 256  # local: hidden width of aux_head=mlp
    async_buffer: int = 0  # local: replay buffer of M stale activations per component (0: off)


@dataclass
class StalenessConfig:
    schedule: str = "pipeline"  # constant | pipeline | list | uniform | geometric | straggler
    k: int = 1  # constant: every component's delay in batch steps
    delays: list[int] = field(default_factory=list)  # list: one delay per component
    cap: int = 4  # uniform/geometric: largest delay drawn (bounds the in-flight memory)
    p: float = 0.5  # geometric: P(delay = d) is p * (1 - p)^d, clipped at cap
    seed: int | None = None  # seed of the random schedules; null: the run's seed
    straggler_component: int = 0  # straggler: index of the slowed component
    straggler_factor: float = 2.0  # straggler: how many times slower that component is


@dataclass
class DiagnosticsConfig:
    cosine_every_n_steps: int = 100  # cosine of applied vs true sync gradient each N steps; 0 off


@dataclass
class SimTimeConfig:
    enabled: bool = True  # log time/sim_step_ms and time/sim_elapsed_s (one component per device)
    measure_reps: int = 5  # timed forward/backward repetitions per component on the first batch
    link_latency_us: float = 10.0  # latency of one message between devices, microseconds
    link_bandwidth_gbs: float = 16.0  # link bandwidth between devices, GB/s


@dataclass
class SynthConfig:
    """Gradient synthesizers of dni/cdni (mach_lightning/synth.py)."""

    hidden: int = 1024  # hidden width of each synthesizer (MLP units or conv channels)
    layers: int = 1  # hidden layers of each synthesizer; 0: a linear map
    optimizer: str = "adam"  # the synthesizers' own optimizer: adam | adamw | sgd
    lr: float = 1e-4  # synthesizers' learning rate
    warmup_steps: int = 0  # batch steps of true (backprop) gradients before synthetic ones
    scale: float = 1.0  # multiplies the synthetic gradient a component applies to its weights


@dataclass
class MachConfig:
    """The MACH family: teachers, target heads and students (mach_lightning/mach.py)."""

    # What each teacher consumes in training: neighbour (the real neighbour's embedding), student
    # (its student's imitation) or both (one target loss on each); a list gives one per component.
    # Evaluation (acc_c{i}) always uses the student. true/false read as student/neighbour.
    use_student: Any = "neighbour"  # neighbour | student | both, or a list, e.g. [both, neighbour]
    target_weight: float = 1.0  # weight of each component's task (cross-entropy) loss
    student_weight: float = 1.0  # weight of each student's distillation (MSE) loss
    student_width: int = 512  # MLP student hidden width
    student_depth: int = 1  # MLP student hidden layers before the embedding layer
    upstream_frozen: bool = False  # mach_single: keep the upstream's weights fixed
    upstream_ckpt: str | None = None  # mach_single: start the upstream from a sync checkpoint


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    max_steps: int = -1  # batch steps (not optimizer steps); -1 means no limit
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # number of devices, or auto
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_cpu ...
    precision: str = "32-true"
    deterministic: bool = False  # torch deterministic algorithms (slower, exact repeats)
    limit_train_batches: float = 1.0  # fraction (<=1.0) or number of batches per epoch
    limit_val_batches: float = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 20  # batch steps between logged training metrics
    progress_bar: bool = True
    lean_steps: bool = True  # direct backward/steps when Lightning's would only pass through
    test_after_fit: bool = True  # evaluate on the test split when training ends


@dataclass
class RunConfig:
    root: str = "runs"  # run directories go to <root>/<name>/<id>
    id: str | None = None  # defaults to a timestamp; fixed ids make resumable runs
    checkpoint_every_n_steps: int = 0  # also save last.ckpt every N batch steps (0: epoch ends)
    slurm_job_id: str | None = None  # set by the Slurm launcher; recorded in W&B's config
    monitor: str = "val/acc"  # metric that picks the best checkpoint
    monitor_mode: str = "max"  # max | min


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "auto"  # auto (offline without API key or network) | online | offline
    project: str = "mach_lightning"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    name: str = "default"  # run name: the run directory is <run.root>/<name>/<id>
    seed: int = 0  # seeds python, numpy, torch and the data order
    resume: bool = False  # continue the latest run of this name from its last.ckpt
    ckpt_path: str | None = None  # or continue from this checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    simtime: SimTimeConfig = field(default_factory=SimTimeConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    mach: MachConfig = field(default_factory=MachConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


class ConfigError(ValueError):
    """A configuration problem, explained in one paragraph that names the key, source and fix."""


# Keys whose value must be one of a fixed set. Values are callables so registries filled
# at import time (topologies, datasets) are read when validating, not when this module loads.
CHOICES: dict[str, Callable[[], list[str]]] = {
    "model.backbone": lambda: ["mlp", "cnn", "resnet"],
    "optim.name": lambda: ["adam", "adamw", "sgd"],
    "optim.scheduler": lambda: ["none", "cosine", "step"],
    "run.monitor_mode": lambda: ["max", "min"],
    "logger.wandb.mode": lambda: ["auto", "online", "offline"],
    "trainer.accelerator": lambda: ["auto", "cpu", "gpu", "cuda", "mps"],
}


def register_choices(key: str, choices: Callable[[], list[str]]) -> None:
    """Let a registry (topologies, datasets, schedules) declare the valid values of a key."""
    CHOICES[key] = choices


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            keys.extend(_all_keys(node, full + "."))
        else:
            keys.append(full)
    return keys


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _explain(err: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in _all_keys(schema) if k.rsplit(".", 1)[0] == section or not section]
        msg = (
            f"Unknown config key '{key}' (from {source}).{_suggest(key, _all_keys(schema))} "
            f"Valid keys here: {', '.join(sorted(siblings))}."
        )
    elif isinstance(err, ValidationError):
        expected = type(OmegaConf.select(schema, key)).__name__ if key != "?" else "?"
        detail = str(err).splitlines()[0]
        msg = f"Bad value for '{key}' (from {source}): {detail}. Expected a {expected}."
    else:
        msg = f"Config error at '{key}' (from {source}): {str(err).splitlines()[0]}."
    return ConfigError(msg)


def _merge(base: DictConfig, layer: DictConfig, source: str, schema: DictConfig) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, source, schema) from None
    # OmegaConf's merge keeps the old value where a layer says ???; a layer that writes ??? means
    # "this must be set by a later layer", so mark those keys missing again.
    for key in _all_keys(layer):
        if OmegaConf.is_missing(layer, key) if "." not in key else _is_missing_path(layer, key):
            OmegaConf.update(merged, key, "???", force_add=False)
    return merged


def _is_missing_path(cfg: DictConfig, key: str) -> bool:
    parent, leaf = key.rsplit(".", 1)
    node = OmegaConf.select(cfg, parent)
    return isinstance(node, DictConfig) and OmegaConf.is_missing(node, leaf)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        hint = _suggest(path.name, [p.name for p in CONFIG_DIR.glob("*.yaml")])
        raise ConfigError(f"Config file '{path}' does not exist.{hint} Files in configs/ work.")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys, not a list or value.")
    return layer


def _parse_override(text: str) -> DictConfig:
    if "=" not in text or text.startswith("="):
        raise ConfigError(
            f"Override '{text}' is not of the form key=value (e.g. model.num_components=4)."
        )
    try:
        return OmegaConf.from_dotlist([text])
    except OmegaConfBaseException as err:
        raise ConfigError(f"Override '{text}' could not be parsed: {err}") from None


def _check_choices(cfg: DictConfig, sources: dict[str, str]) -> None:
    for key, choices_fn in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        choices = choices_fn()
        if value is not None and value not in choices:
            hint = _suggest(str(value), choices)
            raise ConfigError(
                f"'{key}={value}' (from {sources.get(key, 'the defaults')}) is not a valid "
                f"choice.{hint} Valid choices: {', '.join(choices)}."
            )


def _check_missing(cfg: DictConfig, sources: dict[str, str]) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = "; ".join(f"{k} (marked ??? in {sources.get(k, 'the defaults')})" for k in missing)
        raise ConfigError(
            f"Required config value(s) not set: {where}. "
            f"Set them in a config file or on the command line, e.g. {missing[0]}=..."
        )


def _import_registries() -> None:
    """Importing the registries fills CHOICES (topology, dataset and schedule names)."""
    import mach_lightning.data  # noqa: F401
    import mach_lightning.topologies  # noqa: F401


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema_cls: type = Config,
) -> DictConfig:
    """Build and validate a run config: schema, default.yaml, experiment file, overrides."""
    _import_registries()
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    sources: dict[str, str] = {}
    layers = [(DEFAULT_CONFIG, _read_yaml(DEFAULT_CONFIG))]
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG:
        layers.append((Path(path), _read_yaml(Path(path))))
    for layer_path, layer in layers:
        cfg = _merge(cfg, layer, f"file {layer_path}", schema)
        sources.update({k: f"file {layer_path}" for k in _all_keys(layer)})
    for text in overrides or []:
        layer = _parse_override(text)
        cfg = _merge(cfg, layer, f"override '{text}'", schema)
        sources.update({k: f"override '{text}'" for k in _all_keys(layer)})
    _check_missing(cfg, sources)
    _check_choices(cfg, sources)
    validate_semantics(cfg)
    return cfg


def validate_semantics(cfg: DictConfig) -> None:
    """Checks that span keys or need numbers in range; each names the key and the fix."""
    if cfg.model.width < 1 or cfg.model.depth < 0 or cfg.model.embedding_dim < 1:
        raise ConfigError("model.width and model.embedding_dim must be >= 1, model.depth >= 0.")
    if cfg.model.num_components < 1:
        raise ConfigError("model.num_components must be at least 1 (the number of components K).")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must lie strictly between 0 and 1, e.g. 0.1.")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be positive integers.")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}.")
    if cfg.trainer.max_epochs < 1 and cfg.trainer.max_steps < 1:
        raise ConfigError("Set trainer.max_epochs >= 1 or trainer.max_steps >= 1: nothing to do.")
    _validate_staleness(cfg)
    _validate_synth_and_mach(cfg)


def _validate_staleness(cfg: DictConfig) -> None:
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
    t = cfg.topology
    if t.dcasgd_lambda < 0 or t.async_buffer < 0 or t.aux_hidden < 1:
        raise ConfigError(
            "topology.dcasgd_lambda and topology.async_buffer must be >= 0, "
            "topology.aux_hidden >= 1."
        )
    if cfg.diagnostics.cosine_every_n_steps < 0:
        raise ConfigError("diagnostics.cosine_every_n_steps must be >= 0 (0 turns it off).")
    sim = cfg.simtime
    if sim.measure_reps < 1 or sim.link_latency_us < 0 or sim.link_bandwidth_gbs <= 0:
        raise ConfigError(
            "simtime.measure_reps must be >= 1, simtime.link_latency_us >= 0 and "
            "simtime.link_bandwidth_gbs > 0."
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


def _validate_synth_and_mach(cfg: DictConfig) -> None:
    """Synthesizer (dni, cdni) and MACH settings."""
    synth, mach = cfg.synth, cfg.mach
    if synth.hidden < 1 or synth.layers < 0 or synth.warmup_steps < 0:
        raise ConfigError("synth.hidden must be >= 1, synth.layers and synth.warmup_steps >= 0.")
    if synth.lr <= 0 or synth.scale <= 0:
        raise ConfigError(
            f"synth.lr and synth.scale must be positive (got {synth.lr}, {synth.scale})."
        )
    if mach.target_weight < 0 or mach.student_weight < 0:
        raise ConfigError("mach.target_weight and mach.student_weight must be >= 0.")
    if mach.student_width < 1 or mach.student_depth < 0:
        raise ConfigError("mach.student_width must be >= 1 and mach.student_depth >= 0.")
    resolve_student_modes(mach.use_student, cfg.model.num_components)
