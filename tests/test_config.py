"""Config loading: layers, overrides, and errors that name the key, the source and the fix."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import pytest
from omegaconf import OmegaConf

from mach_lightning.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    ConfigError,
    composed_schema,
    load_config,
)


def test_default_yaml_matches_schema_defaults():
    # default.yaml is the documentation of every setting: it must say exactly what the code does,
    # the base sections and every registered method's own, as load_config composes them.
    documented = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG))
    schema = OmegaConf.to_container(OmegaConf.structured(composed_schema()))
    assert documented == schema


def _leaf_names(cls, prefix=""):
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            yield from _leaf_names(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_default_yaml_line_has_a_comment():
    lines = [ln for ln in DEFAULT_CONFIG.read_text().splitlines() if ln.strip() and ":" in ln]
    settings = [
        ln for ln in lines if not ln.strip().startswith("#") and not ln.rstrip().endswith(":")
    ]
    undocumented = [ln for ln in settings if "#" not in ln and "project:" not in ln]
    assert not undocumented, undocumented
    assert len(list(_leaf_names(composed_schema()))) == len(settings)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.topology.name


def test_layers_and_overrides_win_in_order():
    cfg = load_config(CONFIG_DIR / "sync.yaml", ["model.num_components=3", "optim.lr=0.01"])
    assert cfg.name == "sync"  # from the experiment file
    assert cfg.model.num_components == 3  # override beats the file's 2
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.data.batch_size == 128  # from default.yaml


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.widht=3"])
    msg = str(err.value)
    assert "model.widht" in msg and "override 'model.widht=3'" in msg
    assert "Did you mean model.width?" in msg
    assert "model.embedding_dim" in msg  # the section's valid keys are listed


def test_misspelt_key_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"Did you mean model\.embedding_dim\?"):
        load_config(None, ["model.embeding_dim=64"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "optim.lrr" in str(err.value) and str(bad) in str(err.value)
    assert "Did you mean optim.lr?" in str(err.value)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.batch_size=big"])
    msg = str(err.value)
    assert "data.batch_size" in msg and "int" in msg and "data.batch_size=big" in msg


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["topology.name=synk"])
    msg = str(err.value)
    assert "Did you mean sync?" in msg and "Valid choices:" in msg and "sync" in msg


def test_bad_dataset_name_lists_datasets():
    with pytest.raises(ConfigError, match=r"digits.*mnist"):
        load_config(None, ["data.name=imagenet"])


def test_missing_required_value_is_named(tmp_path):
    needs_root = tmp_path / "needs_root.yaml"
    needs_root.write_text("data:\n  name: mnist\n  root: ???\n")
    with pytest.raises(ConfigError) as err:
        load_config(needs_root)
    assert "data.root" in str(err.value) and str(needs_root) in str(err.value)
    cfg = load_config(needs_root, ["data.root=/somewhere"])  # a later layer fills it in
    assert cfg.data.root == "/somewhere"


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CONFIG_DIR / "nope.yaml")


def test_semantic_checks():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="num_components"):
        load_config(None, ["model.num_components=0"])
