"""Packaging: true dependency bounds, package data found from any folder, and a wheel that works.

The slow test builds a wheel, installs it into a fresh venv that cannot see this checkout, and runs
the quick start and each console script from another folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mach_lightning.config import CONFIG_DIR, ConfigError, load_config, resources
from mach_lightning.launch import profiles

from .conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the bounds tests read pyproject.toml
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]
# Releases that may break this code within a few months: each needs an upper bound.
FAST_MOVING = {"torch", "lightning", "torchmetrics", "wandb", "wandb-workspaces", "submitit"}
FAST_MOVING.add("omegaconf")  # slower, but its minor releases have removed features


def requirements() -> dict[str, str]:
    extras = PROJECT["optional-dependencies"]
    texts = [*PROJECT["dependencies"], *extras["publish"], *extras["test"]]
    return {_name(text): text for text in texts}


def _name(text: str) -> str:
    return text.split(">", 1)[0].split("<", 1)[0].split("=", 1)[0].strip().lower()


def test_every_dependency_has_a_lower_bound_and_fast_moving_ones_an_upper_bound():
    reqs = requirements()
    assert FAST_MOVING <= set(reqs), f"missing: {FAST_MOVING - set(reqs)}"
    for name, text in reqs.items():
        assert ">=" in text, f"{text}: no lower bound (scripts/lowest.sh installs it)"
        if name in FAST_MOVING:
            assert "<" in text, f"{text}: a fast-moving dependency needs an upper bound"
    # Trainer.fit/test(weights_only=...) exists from Lightning 2.6 on.
    assert "lightning>=2.6" in reqs["lightning"]


def test_wandb_workspaces_is_only_the_publish_extra():
    assert all(not text.startswith("wandb-workspaces") for text in PROJECT["dependencies"])
    assert [t for t in PROJECT["optional-dependencies"]["publish"] if "wandb-workspaces" in t]


def test_publish_without_wandb_workspaces_names_the_extra(monkeypatch, capsys, tmp_path):
    from mach_lightning.report.__main__ import _publish

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails: not installed
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    assert _publish(None, "sweep", argparse.Namespace(), tmp_path) == 1
    assert 'pip install "mach_lightning[publish]"' in capsys.readouterr().out


def test_console_scripts_are_the_main_functions():
    assert set(SCRIPTS) == {"mach-fit", "mach-launch", "mach-report", "mach-export"}
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), name
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    stale = {n: t for n, t in SCRIPTS.items() if n in installed and installed[n] != t}
    assert not stale, f"reinstall (bash scripts/setup.sh): installed scripts differ: {stale}"


def test_package_data_is_the_repository_folders():
    """One copy of each file: the package's folders are links to configs/ and slurm/."""
    for folder in (resources.CONFIGS, resources.PROFILES):
        link = REPO / "mach_lightning" / folder
        assert link.is_symlink() and link.resolve() == (REPO / folder).resolve(), link
        assert resources.data_dir(folder).resolve() == (REPO / folder).resolve()
    assert CONFIG_DIR == (REPO / "configs").resolve()
    assert (CONFIG_DIR / "seq.yaml").is_file() and (profiles.PROFILE_DIR / "local.yaml").is_file()


def test_configs_and_profiles_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("configs/seq.yaml", "seq.yaml"):
        assert load_config(spec).topology.name == "mach_seq", spec
    assert profiles.load_profile("slurm/local.yaml").partition == "debug"
    assert profiles.load_profile("example-4x8gpu").nodes == 4


def test_a_local_configs_folder_wins_and_bare_names_then_ask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "seq.yaml").write_text("topology:\n  name: sync\n")
    assert load_config("configs/seq.yaml").topology.name == "sync"  # the user's copy
    assert load_config("configs/delayed.yaml").topology.name == "delayed"  # packaged
    # With a local configs/, a bare name could mean either file: say which to write.
    with pytest.raises(ConfigError, match=r"Did you mean configs/seq\.yaml\?"):
        load_config("seq.yaml")


def _copy_sources(dest: Path) -> Path:
    """What the wheel is built from, copied so that the build writes nothing into the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("mach_lightning", "configs", "slurm"):  # the package's links stay links
        shutil.copytree(REPO / folder, dest / folder, symlinks=True, ignore=skip)
    return dest


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _build_wheel(tmp_path: Path) -> Path:
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (pyproject's build requirement)")
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    proc = _run([*pip_wheel, "-w", str(dist), str(src)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("mach_lightning-*.whl")
    return wheel


def _check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry).decode()
        for name in sorted(p.name for p in (REPO / "configs").glob("*.yaml")):
            assert f"mach_lightning/configs/{name}" in names, name
        assert "mach_lightning/slurm/local.yaml" in names
        assert not any(n.endswith("dev-cluster.sh") for n in names)  # a repository tool only
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    for name, target in SCRIPTS.items():
        assert f"{name} = {target}" in scripts


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quick_start_from_another_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)
    venv = tmp_path / "venv"
    # The dependencies come from this environment; mach_lightning must come from the wheel only.
    proc = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bin_dir, install = venv / "bin", ["-m", "pip", "install", "--no-deps", "--no-index"]
    proc = _run([str(bin_dir / "python"), *install, str(wheel)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The checkout's editable install is in the system site-packages too: the venv's copy wins.
    where = "import mach_lightning; print(mach_lightning.__file__)"
    where = _run([str(bin_dir / "python"), "-c", where], work).stdout.strip()
    assert Path(where).is_relative_to(venv), f"mach_lightning is not the wheel's: {where}"

    runs = tmp_path / "runs"
    quick = ["--config", "configs/seq.yaml", "trainer.max_epochs=1", "logger.wandb.enabled=false"]
    fit = _run([str(bin_dir / "mach-fit"), *quick, f"run.root={runs}"], work)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    (result,) = runs.glob("*/*/result.json")
    assert (result.parent / "config.yaml").is_file() and (result.parent / "metrics.csv").is_file()
    assert str(result.parent) in fit.stdout or result.parent.name in fit.stdout

    for name in ("mach-launch", "mach-report", "mach-export"):
        proc = _run([str(bin_dir / name), "--help"], work)
        assert proc.returncode == 0 and "usage:" in proc.stdout, name + proc.stderr[-2000:]
    # Packaged profile and config from this folder; the return code is the function's (2: usage).
    plan = [str(bin_dir / "mach-launch"), "--config", "configs/sync.yaml", f"run.root={runs}"]
    proc = _run([*plan, "--cluster", "slurm/local.yaml", "--dry-run"], work)
    assert proc.returncode == 0 and "#SBATCH" in proc.stdout, proc.stderr[-2000:]
    assert _run(plan, work).returncode == 2  # no --cluster
    assert _run([str(bin_dir / "mach-fit"), "--config", "nope.yaml"], work).returncode == 2
