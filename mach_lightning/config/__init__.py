"""Structured configuration: loading and validation (the base schema is in config/schema.py).

A run's config is built in layers, each later one winning:
  schema defaults -> configs/default.yaml -> the experiment file (--config) -> key=value overrides.
The schema is composed when loading: the base sections plus each registered method's own section
(config/sections.py). This package imports nothing above it, so whoever loads a config imports
the registries first (mach_lightning.methods, mach_lightning.data); every entry point does.
Every layer is validated as it is merged, so an unknown key, a wrong type or a bad choice stops the
run before any work, with a message naming the key, the layer it came from and the valid choices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# Re-exported: callers import the schema, the error and every check from mach_lightning.config.
from mach_lightning.config.checks import (  # noqa: F401
    STUDENT_MODES,
    ConfigError,
    resolve_student_modes,
    validate_runtime,
    validate_staleness,
    validate_synth_and_mach,
)
from mach_lightning.config.legacy import (  # noqa: F401
    MOVED_KEYS,
    migrate_legacy_keys,
    moved_keys_in,
    moved_message,
)
from mach_lightning.config.resources import CONFIGS, data_dir, packaged
from mach_lightning.config.schema import (  # noqa: F401
    Config,
    DataConfig,
    DiagnosticsConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SimTimeConfig,
    StalenessConfig,
    TopologyConfig,
    TrainerConfig,
    WandbConfig,
)
from mach_lightning.config.sections import (  # noqa: F401
    SECTIONS,
    compose,
    config_section,
    register_section,
    section_name,
    sections_of,
)
from mach_lightning.config.trainer_values import (  # noqa: F401
    TRAINER_PRECISIONS,
    TRAINER_STRATEGIES,
    validate_trainer_values,
)
from mach_lightning.config.trainer_values import choice_error as _choice_error
from mach_lightning.config.trainer_values import suggest as _suggest
from mach_lightning.config.yamlfile import load_yaml, nearest_file

# The experiment files shipped in the package (a checkout's package folder links to configs/).
CONFIG_DIR = data_dir(CONFIGS).resolve()
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


# Keys whose value must be one of a fixed set. Values are callables so registries filled
# at import time (topologies, datasets) are read when validating, not when this module loads.
CHOICES: dict[str, Callable[[], list[str]]] = {
    "model.backbone": lambda: ["mlp", "cnn", "resnet"],
    "optim.name": lambda: ["adam", "adamw", "sgd"],
    "optim.scheduler": lambda: ["none", "cosine", "step"],
    "run.monitor_mode": lambda: ["max", "min"],
    "logger.wandb.mode": lambda: ["auto", "online", "offline"],
    "trainer.accelerator": lambda: ["auto", "cpu", "gpu", "cuda", "mps"],
    "runtime.name": lambda: ["sim", "dist"],
    "runtime.mode": lambda: ["lockstep", "free"],
    "runtime.synthesizer": lambda: ["component", "oracle"],
}


def register_choices(key: str, choices: Callable[[], list[str]]) -> None:
    """Let a registry (topologies, datasets, schedules) declare the valid values of a key."""
    CHOICES[key] = choices


def _all_keys(cfg: DictConfig | dict, prefix: str = "") -> list[str]:
    """Every leaf key, dotted; missing values (???) and interpolations are not resolved."""
    tree = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, throw_on_missing=False)
    keys = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            keys.extend(_all_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


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
    moved = moved_keys_in(_all_keys(layer))
    if moved:  # before OmegaConf's unknown-key error, which cannot say where the key went
        raise ConfigError(f"{moved_message(moved[0])} (in {source}).")
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


def locate_config(path: str | Path) -> Path:
    """The experiment file `path` names: that file when it exists, else the packaged one.

    `configs/NAME.yaml` finds the packaged file from any folder; a bare `NAME.yaml` only where no
    local configs/ folder exists, so that it never trains the packaged file in place of the user's
    own (perhaps edited) configs/NAME.yaml. Not found: `path` unchanged, for the error."""
    path = Path(path)
    if path.is_file():
        return path
    return packaged(CONFIGS, path, bare=not Path(CONFIGS).is_dir()) or path


def _missing_config(path: Path) -> ConfigError:
    local = sorted(Path(CONFIGS).glob("*.yaml")) if Path(CONFIGS).is_dir() else []
    names = sorted({p.name for p in [*CONFIG_DIR.glob("*.yaml"), *local]})
    near = nearest_file(path.name, [Path(n) for n in names])
    # configs/NAME.yaml is found from any folder (the local file, else the packaged one).
    hint = f" Did you mean {CONFIGS}/{near.name}?" if near else ""
    return ConfigError(
        f"Config file '{path}' does not exist.{hint} Experiment files in {CONFIGS}/ (shipped "
        f"with mach_lightning, found from any folder): {', '.join(names)}."
    )


def _read_yaml(path: Path) -> DictConfig:
    found = locate_config(path)
    if not found.is_file():
        raise _missing_config(path)
    layer = load_yaml(found, ConfigError, "Config file")
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
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        # The value is parsed as YAML: show which character broke it, not the parser's trace.
        key, value = text.split("=", 1)
        mark = getattr(err, "problem_mark", None)
        at = f" at character {mark.column + 1}" if mark is not None and mark.line == 0 else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"Override '{text}': the value '{value}' is not valid YAML ({problem}{at}). Write "
            f"{key}=VALUE with VALUE a number (4), a list ([16,32]), a mapping ({{a: 1}}) or "
            f"text, quoted if it has spaces or brackets ({key}='a b')."
        ) from None


def _check_choices(cfg: DictConfig, sources: dict[str, str]) -> None:
    for key, choices_fn in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        choices = choices_fn()
        if value is not None and value not in choices:
            raise _choice_error(key, value, choices, sources.get(key, "the defaults"))


def _check_missing(cfg: DictConfig, sources: dict[str, str]) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = "; ".join(f"{k} (marked ??? in {sources.get(k, 'the defaults')})" for k in missing)
        raise ConfigError(
            f"Required config value(s) not set: {where}. "
            f"Set them in a config file or on the command line, e.g. {missing[0]}=..."
        )


# The registries a config is checked against: the key each fills, the module that fills it.
REGISTRIES = {"topology.name": "mach_lightning.methods", "data.name": "mach_lightning.data"}


def composed_schema(base: type = Config) -> type:
    """The run config's schema: `base` plus every registered method's section, one dataclass."""
    missing = [module for key, module in REGISTRIES.items() if key not in CHOICES]
    if missing:
        # Importing them here would make config import the layers above it (a cycle).
        raise ConfigError(
            f"No method or dataset is registered ({', '.join(missing)} not imported), so the "
            f"config cannot be composed or checked. Import mach_lightning.methods and "
            f"mach_lightning.data before calling load_config (the entry points do)."
        )
    return compose(base)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema_cls: type = Config,
) -> DictConfig:
    """Build and validate a run config: schema, default.yaml, experiment file, overrides."""
    schema = OmegaConf.structured(composed_schema(schema_cls))
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
    validate_semantics(cfg, sources)
    return cfg


def validate_semantics(cfg: DictConfig, sources: dict[str, str] | None = None) -> None:
    """Checks that span keys or need numbers in range; each names the key and the fix.

    `sources` maps keys to the layer that set them, to name it in the Trainer values' errors."""
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
    if cfg.trainer.limit_train_batches <= 0:
        raise ConfigError(
            f"trainer.limit_train_batches={cfg.trainer.limit_train_batches} trains nothing: give "
            f"a fraction in (0, 1] or a number of batches > 1."
        )
    if cfg.trainer.divergence_factor < 0:
        raise ConfigError("trainer.divergence_factor must be >= 0 (0: stop on NaN/inf only).")
    validate_trainer_values(cfg, sources or {})
    validate_staleness(cfg)
    validate_synth_and_mach(cfg)
    validate_runtime(cfg)
