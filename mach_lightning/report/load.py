"""Runs as the report sees them, read from run directories (config.yaml, metrics.csv, result.json).

A run directory is any folder holding `config.yaml` (or, not started yet, the launcher's
`launch.json`) outside a `wandb/` or `.submitit/` folder.
`find_runs` resolves the command line: run directories, folders holding them (searched
recursively), a sweep file (`sweeps/staleness.yaml`: its `name`) or a sweep name (`staleness`),
which is `<run root>/<name>/`, where `sweeps/launch.py` puts a sweep's runs.

A run directory whose config.yaml, result.json or metrics.csv cannot be parsed (cut short, empty,
not a mapping) is not read further: it becomes an `unreadable` run, naming the file and what is
wrong, which the report lists under Problems, so one broken run never stops the whole report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mach_lightning import runs
from mach_lightning.report.files import (
    Unreadable,
    read_config,
    read_metrics_csv,
    read_result,
    read_status,
)

SKIP_DIRS = {"wandb", ".submitit", "checkpoints", "logs"}
FINISHED, DIVERGED = "finished", "diverged"
UNREADABLE = "unreadable"


class ReportError(ValueError):
    """Nothing to report on, or a bad request: the message says what was looked for and where."""


@dataclass
class Run:
    """One run: its resolved config (flattened to dotted keys), metric rows and final result."""

    source: str  # the run directory, or entity/project/id for W&B runs
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    result: dict[str, float] | None = None  # None: no result.json (running or crashed)
    state: str = FINISHED  # finished | diverged | running | pending | failed | unreadable | ...
    detail: str = ""  # why an unfinished run is unfinished, when known
    wandb_id: str | None = None  # the W&B run id, when the run logged to W&B
    mtime: float = 0.0

    @property
    def topology(self) -> str:
        return str(self.config.get("topology.name", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x values, values) of every row that logged both, in order of x."""
        pairs = sorted((r[x], r[key]) for r in self.history if key in r and x in r)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def last(self, key: str) -> float | None:
        if self.result and key in self.result:
            return self.result[key]
        values = self.series(key)[1]
        return values[-1] if values else None

    def nonfinite(self) -> list[str]:
        """Loss metrics that reached NaN or infinity (a diverged run)."""
        bad = {
            k
            for row in self.history
            for k, v in row.items()
            if k.endswith("loss") and not math.isfinite(v)
        }
        bad |= {
            k for k, v in (self.result or {}).items() if k.endswith("loss") and not math.isfinite(v)
        }
        return sorted(bad)


def wandb_run_id(config: dict[str, Any], run_dir: Path) -> str | None:
    """The W&B id `runs.make_wandb_logger` gives this run; None when W&B was off."""
    if not config.get("logger.wandb.enabled", False):
        return None
    return runs.wandb_run_id(str(config.get("name")), run_dir)


def shown(run_dir: Path) -> str:
    """The run directory as reports show it: relative to the working directory when inside it."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)


def load_run_dir(run_dir: Path, launch_state=None) -> Run:
    """Read one run directory; `launch_state(run_dir) -> (state, detail)` for unfinished runs.
    A file that cannot be parsed makes the run `unreadable`, its detail naming file and fault."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # submitted by the launcher, not started yet
        state, detail = (launch_state or _unfinished)(run_dir)
        return Run(source=shown(run_dir), config={}, state=state, detail=detail)
    try:
        config = read_config(run_dir / "config.yaml")
    except Unreadable as err:
        detail = _no_config(err, run_dir)
        return Run(source=shown(run_dir), config={}, state=UNREADABLE, detail=detail)
    try:
        result = read_result(run_dir / "result.json")
        history = read_metrics_csv(run_dir / "metrics.csv")
    except Unreadable as err:  # settings readable: listed under its row, as excluded
        return Run(source=shown(run_dir), config=config, state=UNREADABLE, detail=str(err))
    state, detail = FINISHED, ""
    if result is None:
        state, detail = (launch_state or _unfinished)(run_dir)
    elif (status := read_status(run_dir / "result.json"))[0] == DIVERGED:
        state, detail = DIVERGED, status[1] or "stopped as diverged"
    files = [p for p in (run_dir / "metrics.csv", run_dir / "config.yaml") if p.is_file()]
    return Run(
        source=shown(run_dir),
        config=config,
        history=history,
        result=result,
        state=state,
        detail=detail,
        wandb_id=wandb_run_id(config, run_dir),
        mtime=max(p.stat().st_mtime for p in files),
    )


def _no_config(err: Unreadable, run_dir: Path) -> str:
    try:
        finished = read_result(run_dir / "result.json") is not None
    except Unreadable as also:
        return f"{err}; {also}"
    return (
        f"{err}; the run finished (valid result.json), its settings are unknown"
        if finished
        else str(err)
    )


def _unfinished(run_dir: Path) -> tuple[str, str]:
    return "unfinished", "no result.json yet: still running, or crashed"


def launch_states():
    """For unfinished sweep runs: the launcher's view (launch.json, squeue asked once)."""
    queue: list[dict] = []

    def state(run_dir: Path) -> tuple[str, str]:
        if not (run_dir / "launch.json").is_file():
            return _unfinished(run_dir)
        try:
            from mach_lightning.launch.status import job_state, squeue_states
        except ImportError:
            return _unfinished(run_dir)
        if not queue:
            queue.append(squeue_states())
        name, job_id, detail = job_state(run_dir, queue[0])
        where = f"job {job_id}" if job_id else "no job"
        return name.lower(), f"{name.lower()} ({where}){': ' + detail if detail else ''}"

    return state


def run_dirs_under(folder: Path) -> list[Path]:
    """Run directories at or below folder (not descending into a run directory); a folder with
    only the launcher's launch.json is a submitted run that has not started yet."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file() or (folder / "launch.json").is_file():
        return [folder]
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
        found += run_dirs_under(child)
    return found


def sweep_name(spec: str) -> str | None:
    """The `name` in a sweep file given as a path or as a name in sweeps/; None if no such file."""
    candidates = [Path(spec), Path("sweeps") / f"{spec}.yaml"]
    for path in candidates:
        if path.suffix in (".yaml", ".yml") and path.is_file():
            data = OmegaConf.to_container(OmegaConf.load(path))
            return str(data.get("name") or path.stem) if isinstance(data, dict) else path.stem
    return None


def resolve_targets(targets: list[str], run_root: Path) -> tuple[list[Path], str]:
    """Run directories for the command line's targets, and a name for the report."""
    dirs: list[Path] = []
    for spec in targets:
        path = Path(spec)
        if path.is_dir():
            dirs += run_dirs_under(path)
            continue
        name = sweep_name(spec) or spec
        folder = Path(run_root) / name
        if not folder.is_dir():
            raise ReportError(
                f"'{spec}' is neither a folder nor a sweep with runs under {folder}. Give run "
                f"directories, a folder holding them, a sweep file or a sweep name (its runs "
                f"live in <run root>/<name>; set --run-root if not '{run_root}')."
            )
        dirs += run_dirs_under(folder)
    unique = list(dict.fromkeys(p.resolve() for p in dirs))
    if not unique:
        raise ReportError(
            f"No run directories (folders with config.yaml) under: {', '.join(targets)}."
        )
    first = Path(targets[0])
    name = sweep_name(targets[0]) or (first.resolve().name if first.exists() else targets[0])
    return unique, name


def load_local(targets: list[str], run_root: Path = Path("runs")) -> tuple[list[Run], str]:
    dirs, name = resolve_targets(targets, run_root)
    state = launch_states()
    return [load_run_dir(d, state) for d in dirs], name
