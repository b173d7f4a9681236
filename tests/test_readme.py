"""The README stays true: its quick start, its topology table and the config files it names."""

from __future__ import annotations

import re
from pathlib import Path

from mach_lightning.config import load_config
from mach_lightning.methods import list_topologies

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    train, test = quick_start_commands()
    assert "python -m mach_lightning.fit --config configs/seq.yaml" in train
    assert test.endswith("python -m pytest")
    ci_lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert test in ci_lines, f".ci/run must run the README's test command: {test}"


def test_quick_start_creates_a_virtualenv_before_the_two_commands():
    before = README.split("## Quick start", 1)[1].split("```bash", 1)[0]
    assert "python -m venv .venv && . .venv/bin/activate" in before


def test_the_commands_the_readme_names_are_console_scripts():
    named = set(re.findall(r"`(mach-[a-z]+)", README))
    scripts = set(re.findall(r"^(mach-[a-z]+) = ", (REPO / "pyproject.toml").read_text(), re.M))
    assert named and named <= scripts, f"README names {named - scripts}, not in [project.scripts]"


def test_topology_table_lists_every_registered_topology_with_a_loadable_config():
    table = README.split("## Topologies", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {re.match(r"\| `(\w+)`", row).group(1): row for row in rows}
    assert set(named) == set(list_topologies())
    for name, row in named.items():
        config = re.search(r"`(configs/[\w.]+\.yaml)`", row).group(1)
        cfg = load_config(REPO / config, [])
        assert cfg.topology.name == name, f"{config} trains {cfg.topology.name}, not {name}"


def test_every_config_file_the_readme_names_exists():
    for path in set(re.findall(r"configs/[\w.]+\.yaml", README)):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"
