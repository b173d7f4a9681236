"""The layering of mach_lightning, as pyproject.toml's [tool.importlinter] contracts state it.

`lint-imports` must pass on the package; the contracts must cover every module (grimp silently
skips a folder without __init__.py) and every top-level package or module; and the same contracts
must catch a layer violation and an import cycle planted in a copy of the package, so the check
cannot pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from .conftest import REPO

PACKAGE = "mach_lightning"
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with the contracts in pyproject.toml."""
    config = str(REPO / "pyproject.toml")
    # The package under root first; wide columns so that no violation line is wrapped; no cache
    # directory left behind.
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", LINT, config, "--no-cache", "--no-logo", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def settings() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_the_package_keeps_its_layering():
    result = lint(REPO)
    # lint-imports says nothing when its configuration cannot be used (e.g. a root package that
    # is not a top-level one); --debug shows why
    report = (result.stdout + result.stderr).strip() or "(no report: run lint-imports --debug)"
    if result.returncode != 0:  # pytest.fail: the linter's report, not a repr of the process
        pytest.fail(
            "lint-imports: the imports break pyproject.toml's [tool.importlinter] contracts (the "
            "layering, and no import cycles within a package). Move the imported code down a "
            f"layer, or the importing code up:\n{report}",
            pytrace=False,
        )


def test_every_module_of_the_package_is_checked():
    import grimp

    graph = grimp.build_graph(*settings()["root_packages"], cache_dir=None)
    source = REPO / PACKAGE
    modules = set()
    for path in source.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    missing = sorted(modules - set(graph.modules))
    assert not missing, (
        f"not in the graph import-linter checks, so never checked: {missing}. Their folder "
        "has no __init__.py (a namespace package, which grimp does not descend into): add one, "
        "or name the folder in [tool.importlinter] root_packages."
    )


def test_every_top_level_package_and_module_has_a_layer():
    contract = next(c for c in settings()["contracts"] if c["type"] == "layers")
    prefix = "".join(f"{c}." for c in contract.get("containers", []))  # layers relative to it
    names = (name for layer in contract["layers"] for name in layer.replace(":", "|").split("|"))
    named = {prefix + name.strip() for name in names}
    children = {
        f"{PACKAGE}.{p.stem if p.is_file() else p.name}"
        for p in (REPO / PACKAGE).iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and any(p.glob("*.py")))
    }
    assert children <= named, (
        f"{sorted(children - named)} in no layer of pyproject.toml's layers contract: a module "
        "in no layer may import anything. Add it to the layer it belongs to."
    )


# (file to plant the import in, the import, what lint-imports must then say)
PLANTED = {
    "layer violation": (
        "config/resources.py",
        "import mach_lightning.training",
        "mach_lightning.config is not allowed to import mach_lightning.training",
    ),
    "import cycle": (
        "launch/profiles.py",
        "import mach_lightning.launch.cli",
        "No cycles are allowed in mach_lightning.launch",
    ),
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_a_planted_bad_import_is_caught(kind, tmp_path):
    target, statement, expected = PLANTED[kind]
    shutil.copytree(
        REPO / PACKAGE,
        tmp_path / PACKAGE,
        ignore=shutil.ignore_patterns("__pycache__", "configs", "slurm"),
    )
    planted = tmp_path / PACKAGE / target
    planted.write_text(planted.read_text() + f"\n{statement}  # planted by test_layering\n")
    result = lint(tmp_path)
    assert result.returncode == 1 and expected in result.stdout, (
        f"lint-imports did not catch a {kind} planted in {target} ({statement}); the contracts in "
        f"pyproject.toml check less than they should:\n{result.stdout}{result.stderr}"
    )
