"""Each method's config section: declared next to the method, registered, composed at load time;
the old flat topology keys refused with their new names, and migrated in saved configs."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mach_lightning import config as config_pkg
from mach_lightning.config import (
    CHOICES,
    MOVED_KEYS,
    SECTIONS,
    ConfigError,
    composed_schema,
    config_section,
    load_config,
    migrate_legacy_keys,
    register_section,
    sections_of,
)
from mach_lightning.methods import TOPOLOGIES, list_topologies, register_topology
from mach_lightning.report.files import read_config
from mach_lightning.resume import config_changes

CONFIG_DIR = Path(config_pkg.__file__).parent

EXPECTED = {  # section -> the methods that read it
    "delayed": ["delayed"],
    "local": ["local"],
    "synth": ["cdni", "dni"],
    "mach": ["mach_kgraph", "mach_seq", "mach_single"],
}


@pytest.fixture
def registries():
    """Registrations made by a test are undone after it (other tests see the real registry)."""
    sections, topologies = copy.deepcopy(SECTIONS), dict(TOPOLOGIES)
    yield
    SECTIONS.clear()
    SECTIONS.update(sections)
    TOPOLOGIES.clear()
    TOPOLOGIES.update(topologies)


# ----- every registered method's section is in the composed schema -----


@pytest.mark.parametrize("name", list_topologies())
def test_each_methods_section_is_composed_with_its_defaults(name):
    schema = OmegaConf.structured(composed_schema())
    cfg = load_config(None, [f"topology.name={name}"])
    sections = sections_of(name)
    assert [s.name for s in sections] == [n for n in [TOPOLOGIES[name].config_section] if n]
    for section in sections:
        defaults = OmegaConf.to_container(OmegaConf.structured(section.schema))
        assert OmegaConf.to_container(schema[section.name]) == defaults
        assert OmegaConf.to_container(cfg[section.name]) == defaults  # default.yaml agrees


def test_the_sections_and_their_readers():
    assert {n: sorted(s.methods) for n, s in SECTIONS.items()} == EXPECTED
    assert set(OmegaConf.structured(composed_schema()).topology) == {"name"}
    assert OmegaConf.structured(composed_schema()).mach.grad_mode == "stash"


def test_a_section_registered_here_composes(registries):
    @config_section("toy")
    @dataclass
    class ToyConfig:
        alpha: int = 3  # a toy setting

    @register_topology(section=ToyConfig)
    class Toy:
        name = "toy_method"

    cfg = load_config(None, ["topology.name=toy_method", "toy.alpha=5"])
    assert cfg.toy.alpha == 5 and cfg.delayed.grad_mode == "stash"
    assert Toy.config_section == "toy" and SECTIONS["toy"].methods == ["toy_method"]
    with pytest.raises(ConfigError, match=r"toy\.alpha.*int"):
        load_config(None, ["toy.alpha=lots"])
    with pytest.raises(ConfigError, match=r"Did you mean toy\.alpha\?"):
        load_config(None, ["toy.alpah=1"])


def test_section_registration_errors_name_the_fix(registries):
    @dataclass
    class Other:
        x: int = 0

    with pytest.raises(ValueError, match="already declared by .*DelayedConfig"):
        register_section("delayed", Other)
    with pytest.raises(TypeError, match="not a dataclass"):
        register_section("plain", int)
    with pytest.raises(ValueError, match=r"@config_section\('NAME'\)"):
        register_topology(section=Other)(type("Nameless", (), {"name": "nameless"}))
    register_section("model", Other)  # a base section's key: refused when composing
    with pytest.raises(ValueError, match="clashes with the base section 'model'"):
        composed_schema()


def test_no_registered_method_says_what_to_import(monkeypatch):
    monkeypatch.delitem(CHOICES, "topology.name")
    with pytest.raises(ConfigError, match="Import mach_lightning.methods"):
        load_config(None, [])


def test_importing_config_imports_no_method_and_loading_then_says_why():
    code = (
        "import sys, mach_lightning.config as c\n"
        "print(any(m.startswith(('mach_lightning.methods', 'mach_lightning.data')) "
        "for m in sys.modules))\n"
        "try:\n    c.load_config(None, [])\nexcept c.ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, message = out.stdout.splitlines()[:2]
    assert imported == "False"
    assert "mach_lightning.methods" in message and "load_config" in message


# ----- the old flat keys -----


def test_old_override_names_the_new_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["topology.grad_mode=recompute"])
    msg = str(err.value)
    assert (
        "topology.grad_mode moved: use delayed.grad_mode (for delayed) or mach.grad_mode "
        "(for the MACH topologies)" in msg
    )
    assert "override 'topology.grad_mode=recompute'" in msg


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_every_old_key_errors_with_its_new_name_in_a_file(old, tmp_path):
    leaf = old.split(".", 1)[1]
    path = tmp_path / "old.yaml"
    path.write_text(f"topology:\n  name: delayed\n  {leaf}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{old} moved: use" in msg and str(path) in msg
    assert all(new in msg for new, _, _ in MOVED_KEYS[old])


# ----- saved configs (checkpoints, run directories) migrate -----


def legacy_layout(tree: dict) -> dict:
    """A config as saved before the sections moved: every topology setting flat in `topology`."""
    old = copy.deepcopy(tree)
    delayed, local = old.pop("delayed"), old.pop("local")
    mach_mode = old["mach"].pop("grad_mode")
    mode = mach_mode if old["topology"]["name"].startswith("mach_") else delayed["grad_mode"]
    old["topology"].update({**delayed, **local, "grad_mode": mode})
    return old


def saved(*overrides: str) -> dict:
    return OmegaConf.to_container(load_config(None, list(overrides)), resolve=True)


def test_a_checkpoint_config_with_old_keys_migrates():
    new = saved("topology.name=delayed", "delayed.grad_mode=recompute", "delayed.dcasgd_lambda=0.1")
    old = legacy_layout(new)
    before = copy.deepcopy(old)
    migrated = migrate_legacy_keys(old)
    assert old == before  # the caller's dict is left as it was
    assert migrated["topology"] == {"name": "delayed"}
    assert migrated["delayed"] == new["delayed"]
    assert "local" not in migrated  # delayed never read local's keys: dropped, not guessed
    assert migrate_legacy_keys(new) is new  # nothing to do: the same dict back


def test_a_mach_runs_grad_mode_goes_to_the_mach_section():
    new = saved("topology.name=mach_seq", "mach.grad_mode=recompute")
    migrated = migrate_legacy_keys(legacy_layout(new))
    assert migrated["mach"] == new["mach"] and "delayed" not in migrated


def test_resume_from_an_old_checkpoint_compares_the_migrated_keys():
    cfg = load_config(None, ["topology.name=local", "local.async_buffer=4"])
    old = legacy_layout(OmegaConf.to_container(cfg, resolve=True))
    assert config_changes(cfg, old, "Checkpoint old.ckpt") == {}
    old["topology"]["async_buffer"] = 8
    with pytest.raises(ConfigError, match=r"local\.async_buffer: 8 in the checkpoint, 4 now"):
        config_changes(cfg, old, "Checkpoint old.ckpt")


def test_an_old_run_directorys_config_reads_with_the_new_keys(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(legacy_layout(saved("topology.name=delayed"))))
    flat = read_config(path)
    assert flat["delayed.grad_mode"] == "stash" and "topology.grad_mode" not in flat


# ----- the config package stays the bottom layer -----


@pytest.mark.parametrize("module", sorted(p.name for p in CONFIG_DIR.glob("*.py")))
def test_config_modules_import_nothing_above_config(module):
    # schema.py, sections.py and legacy.py import nothing of mach_lightning at all; the others
    # only the config package itself (an import-linter contract keeps the layers in CI).
    tree = ast.parse((CONFIG_DIR / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    ours = [n for n in names if n.split(".")[0] == "mach_lightning"]
    if module in ("schema.py", "sections.py", "legacy.py"):
        assert ours == [], f"config/{module} imports {ours}"
    else:
        above = [n for n in ours if not n.startswith("mach_lightning.config")]
        assert above == [], f"config/{module} imports {above}"
