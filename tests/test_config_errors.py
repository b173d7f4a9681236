"""Config errors caught at loading instead of deep inside Lightning: Trainer values, bad YAML in
overrides and files, missing files. The hard-coded Trainer lists are checked against Lightning."""

from __future__ import annotations

import subprocess
import sys
import typing
import warnings

import pytest

from mach_lightning import config
from mach_lightning.config import ConfigError, load_config, validate_semantics

from .conftest import REPO


def _literals(tp) -> list:
    """Every value of a (nested) Union of Literals, as in Trainer.__init__'s annotations."""
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return [v for arg in typing.get_args(tp) for v in _literals(arg)]


def test_strategy_list_is_lightnings_registry():
    from lightning.pytorch.strategies import StrategyRegistry

    assert set(config.TRAINER_STRATEGIES) == {"auto", *StrategyRegistry.available_strategies()}


def test_precision_list_is_the_trainer_signatures():
    # Trainer.__init__'s public annotation lists every precision it accepts (ints as "64" etc.).
    from lightning.pytorch import Trainer

    hint = typing.get_type_hints(Trainer.__init__)["precision"]
    assert set(config.TRAINER_PRECISIONS) == {str(v) for v in _literals(hint)}


def _cpu_trainer(**kwargs):
    from lightning.pytorch import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. 16-mixed on CPU falls back to bf16 with a warning
        return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)


@pytest.mark.parametrize(
    "precision", [p for p in config.TRAINER_PRECISIONS if not p.startswith("transformer-engine")]
)
def test_each_listed_precision_builds_a_trainer(precision):
    # transformer-engine needs its own package and a GPU; the signature test covers those two.
    _cpu_trainer(precision=precision, devices=1)


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("trainer.devices=abc", "trainer.devices", "trainer.devices=[0,1]"),
        ("trainer.precision=64-foo", "trainer.precision", "bf16-mixed"),
        ("trainer.strategy=dpp", "trainer.strategy", "Did you mean ddp?"),
    ],
)
def test_bad_trainer_values_stop_loading_with_the_fix(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "sync.yaml", [override])
    msg = str(err.value)
    assert f"'{override}'" in msg and key in msg and hint in msg
    assert f"from override '{override}'" in msg  # names the layer that set it


def _devices_ok(devices, accelerator="auto") -> bool:
    cfg = load_config(None, [f"trainer.accelerator={accelerator}"])
    cfg.trainer.devices = devices
    try:
        validate_semantics(cfg)
    except ConfigError as err:
        assert "trainer.devices" in str(err)
        return False
    return True


def test_device_forms_lightning_accepts():
    for ok in ("auto", 1, 4, -1, [0, 1], "0,1", "0,", "2"):
        assert _devices_ok(ok), ok
    for bad in ("abc", 0, -2, True, [], [-1], ["a"], "0,a", 1.5):
        assert not _devices_ok(bad), bad


@pytest.mark.parametrize("devices", ["auto", 1, 2, "2", -1, [0], "0,1", 0, "abc"])
def test_cpu_devices_check_agrees_with_lightning(devices):
    # With accelerator=cpu Lightning takes only a process count: the check must say the same.
    try:
        _cpu_trainer(devices=devices)
        lightning_ok = True
    except Exception:
        lightning_ok = False
    assert _devices_ok(devices, "cpu") == lightning_ok


def test_loading_a_config_does_not_import_lightning():
    code = "import sys, mach_lightning.config; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_override_with_bad_yaml_is_one_clear_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.channels=[16,32]x"])
    msg = str(err.value)
    assert "\n" not in msg and "Override 'model.channels=[16,32]x'" in msg
    assert "not valid YAML" in msg and "at character 8" in msg  # the stray x
    assert "model.channels=VALUE" in msg and "([16,32])" in msg  # the expected form
    assert "unicode string" not in msg  # none of the parser's own wording


def test_missing_config_suggests_the_path_that_exists(monkeypatch):
    monkeypatch.chdir(REPO)
    for given in ("seq.yaml", "seq", "configs/seqq.yaml"):
        with pytest.raises(ConfigError, match=r"Did you mean configs/seq\.yaml\?") as err:
            load_config(given)
        assert "sync.yaml" in str(err.value)  # the available files are listed
    assert (REPO / "configs" / "seq.yaml").is_file()


def test_config_file_with_bad_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  channels: [16, 32\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "line 3, column 6" in msg and "line 2, column 13" in msg
    assert "\n" not in msg
