"""Package data: the default configs (`configs/`) and the cluster profiles (`slurm/`).

One copy of each file: the repository's top-level `configs/` and `slurm/` hold them, the folders
users see and edit, and `mach_lightning/configs` and `mach_lightning/slurm` are symlinks to those
folders. setuptools follows the links when it builds an sdist or a wheel, so both carry real files
(tests/test_packaging.py installs a wheel and runs from it); the package runs on POSIX only
(fcntl locks), where git keeps the links. The links point this way, not the other, so that paths
resolve to `configs/...` in a checkout, as runs and launch plans print and record them.

A path a user gives is taken as given when that file exists; otherwise `configs/NAME.yaml` (and
`slurm/NAME.yaml`) name the packaged file from any folder, so the README's commands work from an
installed wheel too.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIGS = "configs"
PROFILES = "slurm"


def data_dir(folder: str) -> Path:
    """A package-data folder as a filesystem path.

    A wheel installs as plain files (torch cannot be imported from a zip either), so the resource
    is a real folder; callers glob it and hand its paths to OmegaConf and to jobs on other nodes."""
    resource = files("mach_lightning").joinpath(folder)
    if not isinstance(resource, Path):
        raise RuntimeError(f"mach_lightning's {folder}/ must be installed as files, not {resource}")
    return resource


def packaged(folder: str, spec: str | Path, bare: bool = True) -> Path | None:
    """The packaged file that `FOLDER/NAME.yaml` (or `NAME.yaml`, if `bare`) names, else None."""
    parts = Path(spec).parts
    if not ((len(parts) == 2 and parts[0] == folder) or (bare and len(parts) == 1)):
        return None
    candidate = data_dir(folder) / parts[-1]
    return candidate if candidate.is_file() else None
