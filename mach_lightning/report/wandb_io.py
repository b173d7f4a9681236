"""W&B on the report's side: is it online, and runs read through the public API (`--source wandb`).

Nothing here may fail a report for want of W&B: without an API key or network, `online()` says
why, `--publish` explains and the local report is written anyway; only `--source wandb` (which has
nothing else to read) stops, with the reason and the local alternative.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mach_lightning.config import migrate_legacy_keys
from mach_lightning.panels import simulator_metrics
from mach_lightning.report.files import flatten
from mach_lightning.report.load import FINISHED, ReportError, Run

STEP = "trainer/global_step"
NUMERIC_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""


def has_api_key(host: str | None = None) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and (host or _host()) in netrc.read_text(errors="ignore")


def online() -> tuple[bool, str]:
    """(True, '') when the W&B API can be used; else (False, why not)."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return False, f"WANDB_MODE={mode}"
    if not has_api_key():
        return False, "no W&B API key is configured (`wandb login`, or set WANDB_API_KEY)"
    from mach_lightning.runs import _reachable

    if not _reachable(_host()):
        return False, f"{_host()} cannot be reached (no network)"
    return True, ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in NUMERIC_STRINGS:
        return NUMERIC_STRINGS[value]
    return None


def numeric(row: dict) -> dict[str, float]:
    """The numeric entries of a history row or summary (NaN/Infinity strings included)."""
    out = {}
    for key, value in row.items():
        number = _number(value)
        if number is not None and not key.startswith("_"):
            out[key] = number
    return out


def from_wandb_run(wrun, entity: str, project: str) -> Run:
    """A public-API run as a report Run: config, full history, summary as the result."""
    config = {k: v for k, v in dict(wrun.config).items() if not k.startswith("_")}
    config = flatten(migrate_legacy_keys(config))  # a run logged before the method sections
    dist = config.get("runtime.name") == "dist"  # its W&B names: a section per component
    history = [numeric(row) for row in wrun.scan_history()]
    if dist:
        history = [simulator_metrics(row) for row in history]
    for row in history:  # WandbLogger logs the batch step as trainer/global_step
        if "step" not in row and STEP in row:
            row["step"] = row[STEP]
    state = FINISHED if wrun.state == "finished" else str(wrun.state)
    result = numeric(dict(wrun.summary)) if state == FINISHED else None
    if dist and result is not None:
        result = simulator_metrics(result)
    created = getattr(wrun, "created_at", None)
    try:
        mtime = datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except ValueError:
        mtime = 0.0
    return Run(
        source=f"{entity}/{project}/{wrun.id}",
        config=config,
        history=[h for h in history if h],
        result=result,
        state=state,
        wandb_id=wrun.id,
        mtime=mtime,
    )


def load_wandb(
    groups: list[str], entity: str | None, project: str, api=None
) -> tuple[list[Run], str]:
    """Runs of the given W&B groups (a sweep's name is its runs' group) in entity/project."""
    if api is None:
        ok, why = online()
        if not ok:
            raise ReportError(
                f"--source wandb needs the W&B API, but {why}. Report on the local "
                "run directories instead (the default --source local)."
            )
        import wandb

        api = wandb.Api(timeout=60)
    entity = entity or api.default_entity
    runs = []
    for group in groups:
        found = [
            from_wandb_run(r, entity, project)
            for r in api.runs(f"{entity}/{project}", filters={"group": group})
        ]
        if not found:
            raise ReportError(f"No W&B runs in group '{group}' of {entity}/{project}.")
        runs += found
    return runs, groups[0]
