"""Trainer values (devices, precision, strategy) checked as Lightning's Trainer will check them,
without importing Lightning (slow); and the "not a valid choice" error every choice check shares.
"""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig, ListConfig

from mach_lightning.config.checks import ConfigError


def suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def choice_error(key: str, value: Any, choices: list[str], source: str) -> ConfigError:
    return ConfigError(
        f"'{key}={value}' (from {source}) is not a valid choice.{suggest(str(value), choices)} "
        f"Valid choices: {', '.join(choices)}."
    )


# What Lightning 2.x's Trainer accepts, hard-coded so that loading a config never imports Lightning
# (slow); tests/test_config_errors.py checks both lists against Lightning's own, so an upgrade
# that changes them fails there instead of at Trainer construction on a cluster.
TRAINER_STRATEGIES = """
    auto ddp ddp_spawn ddp_fork ddp_notebook
    ddp_find_unused_parameters_false ddp_find_unused_parameters_true
    ddp_spawn_find_unused_parameters_false ddp_spawn_find_unused_parameters_true
    ddp_fork_find_unused_parameters_false ddp_fork_find_unused_parameters_true
    ddp_notebook_find_unused_parameters_false ddp_notebook_find_unused_parameters_true
    deepspeed deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_2_offload deepspeed_stage_3
    deepspeed_stage_3_offload deepspeed_stage_3_offload_nvme fsdp fsdp_cpu_offload
    single_device single_xla xla_debug xla single_tpu
""".split()
TRAINER_PRECISIONS = """
    32-true 32 64-true 64 16-mixed 16 bf16-mixed bf16 16-true bf16-true
    transformer-engine transformer-engine-float16
""".split()
DEVICES_FORMS = (
    "auto, a positive number of devices per node (-1: all of them), or GPU indices as a list or "
    "a comma-separated string (trainer.devices=[0,1] or trainer.devices='0,1')"
)


def _device_ids(value: Any) -> int | list[int] | str | None:
    """trainer.devices as Lightning reads it ('auto', a count or indices), None if it cannot."""
    if isinstance(value, bool):
        return None  # bool is an int to Python, but devices=true is a mistake
    if value == "auto" or isinstance(value, int):
        return value
    if isinstance(value, (list, ListConfig)):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return list(value) if ok else None
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]  # Lightning drops empty parts: "0,"
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            return None
        return ids if "," in value else (ids[0] if ids else None)
    return None


def validate_trainer_values(cfg: DictConfig, sources: dict[str, str]) -> None:
    """trainer.devices, .precision and .strategy as Lightning's Trainer will check them."""
    t = cfg.trainer
    for key, value, choices in (
        ("trainer.strategy", t.strategy, TRAINER_STRATEGIES),
        ("trainer.precision", t.precision, TRAINER_PRECISIONS),
    ):
        if value not in choices:
            raise choice_error(key, value, choices, sources.get(key, "the defaults"))
    source = sources.get("trainer.devices", "the defaults")
    ids = _device_ids(t.devices)
    bad_count = isinstance(ids, int) and ids < 1 and ids != -1
    bad_list = isinstance(ids, list) and (not ids or min(ids) < 0)
    if ids is None or bad_count or bad_list:
        raise ConfigError(
            f"'trainer.devices={t.devices}' (from {source}) is not a valid device setting. "
            f"Use {DEVICES_FORMS}."
        )
    if t.accelerator == "cpu" and not (ids == "auto" or (isinstance(ids, int) and ids >= 1)):
        raise ConfigError(
            f"'trainer.devices={t.devices}' (from {source}) does not work with "
            "trainer.accelerator=cpu: Lightning runs a number of CPU processes, so use auto or "
            "a positive integer, e.g. trainer.devices=2."
        )
