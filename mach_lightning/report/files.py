"""Reading a run directory's files, each either parsed or refused with what is wrong with it.

A file cut short (a full disk, a copy interrupted, a node lost mid-write), empty, or of the wrong
shape raises `Unreadable`, whose message names the file and the fault, e.g.
`result.json: not valid JSON (cut short?): Expecting ',' delimiter: line 3 column 1 (char 40)`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mach_lightning.config import migrate_legacy_keys
from mach_lightning.launch.status import Unreadable, read_object  # noqa: F401 (re-exported)

REQUIRED = ("topology.name",)  # in every resolved config: its absence means a cut-short file


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'model': {'width': 8}} -> {'model.width': 8}; lists become tuples (hashable, comparable)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        return {prefix[:-1]: tuple(tree)}
    return {prefix[:-1]: tree}


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """Lightning's sparse CSV: each row keeps only the columns it logged, as floats."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise Unreadable(path, f"not a readable CSV file: {err}") from None
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            if key and value not in ("", None):
                try:
                    parsed[key] = float(value)
                except ValueError:
                    continue
        out.append(parsed)
    return out


def read_config(path: Path) -> dict[str, Any]:
    """config.yaml, resolved and flattened; Unreadable when it is not a usable config."""
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.MarkedYAMLError as err:
        where = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise Unreadable(path, f"not valid YAML (cut short?): {err.problem}{where}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise Unreadable(path, f"cannot be read: {str(err).splitlines()[0]}") from None
    if not tree:
        raise Unreadable(path, "empty: no settings")
    if not isinstance(tree, dict):
        raise Unreadable(path, f"holds a YAML {type(tree).__name__}, not a mapping")
    config = flatten(migrate_legacy_keys(tree))  # a run from before the method sections: new keys
    missing = [k for k in REQUIRED if config.get(k) is None]
    if missing:
        raise Unreadable(path, f"no {', '.join(missing)} (cut short?)")
    return config


def read_result(path: Path) -> dict[str, float] | None:
    """result.json's numbers (its strings, such as `status`, are left out); None: no file."""
    data = read_object(path)
    if data is None:
        return None
    numbers = (int, float)
    return {
        k: float(v) for k, v in data.items() if isinstance(v, numbers) and not isinstance(v, bool)
    }


def read_status(path: Path) -> tuple[str, str]:
    """(status, reason) that fit wrote into a readable result.json: ('finished', '') for files
    written before result.json carried a status."""
    data = json.loads(path.read_text())
    return str(data.get("status", "finished")), str(data.get("reason", ""))
