"""Sweep files expanded into jobs: grid x random samples x seeds, plus the sync baselines.

    name: staleness                 # W&B group; runs go to <run.root>/<name>/<job key>
    config: configs/delayed.yaml    # base experiment file (layered over configs/default.yaml)
    overrides: [data.name=mnist]    # key=value for every job
    grid:                           # every combination; "*" = every registered choice
      staleness.schedule: [constant, pipeline]    # (a list of such maps: their union)
    random: {samples: 4, seed: 0, axes: {optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}
    seeds: [0, 1, 2]
    baseline: sync                  # or {config: ..., overrides: [...], keep: [data., model.]}

A baseline job keeps the seed and the axes whose keys start with `keep` (default data., model.,
optim., trainer.), drops the others, and applies the baseline overrides (`sync` means
topology.name=sync). Validation (`mach_lightning.launch.submit.prepare`) drops a baseline whose
resolved config is already one of the sweep's jobs. Reading and checking the file:
`mach_lightning.launch.sweep_spec`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

# SweepError is re-exported: the command line and submit.py catch it from here.
from mach_lightning.launch.sweep_spec import (  # noqa: F401
    SweepError,
    grid_points,
    random_points,
    read_sweep,
)


@dataclass
class Job:
    key: str  # the run id: the run directory is <run.root>/<name>/<key>
    name: str | None  # config `name` (None: the config's own)
    config: str | None  # experiment file, absolute path
    overrides: list[str]  # key=value, in order
    tags: list[str] = field(default_factory=list)  # W&B tags: the axes' values
    baseline: bool = False
    group: str | None = None  # W&B group: the sweep's name
    run_dir: Path | None = None  # set by validation
    topology: str = ""  # set by validation


def format_value(value: Any) -> str:
    """A value as the right-hand side of a key=value override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    return f"'{text}'" if re.search(r"[\s,\[\]{}'\"=]", text) else text


def _label(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    if isinstance(value, (list, tuple, ListConfig)):
        value = "+".join(_label(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def short_names(keys: list[str]) -> dict[str, str]:
    """`staleness.schedule` -> `schedule`, `topology.name` -> `topology`; full key if ambiguous."""

    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    names = [short(k) for k in keys]
    return {k: (n if names.count(n) == 1 else k) for k, n in zip(keys, names)}


def job_key(values: dict[str, Any], names: dict[str, str], seed: int, prefix: str = "") -> str:
    parts = [f"{names[k]}-{_label(v)}" for k, v in values.items()] + [f"seed-{seed}"]
    return prefix + "__".join(parts)


def _abs(config: str | None, base: Path) -> str | None:
    if not config:
        return None
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path  # relative to the sweep file's repository
    elif not path.exists():
        from mach_lightning.config import locate_config

        path = locate_config(path)  # configs/NAME.yaml shipped with the package (a wheel)
    return str(path.resolve())


def expand_sweep(
    path: str | Path, extra: list[str], cluster: list[str] = ()
) -> tuple[dict, list[Job]]:
    """The sweep's jobs, baselines last. Each job's overrides, later ones winning: the sweep's,
    the axes', the seed, `cluster` (the profile's config_overrides), `extra` (command line's)."""
    spec, source = read_sweep(path), str(path)
    repo = Path(path).resolve().parent.parent
    config = _abs(spec.get("config"), repo)
    fixed = [str(o) for o in spec.get("overrides") or []]
    extra = list(cluster) + list(extra)
    samples = random_points(spec.get("random"), source)  # seeded: the same draws every time
    points = [{**g, **r} for g in grid_points(spec.get("grid") or {}, source) for r in samples]
    names = short_names(list(dict.fromkeys(k for p in points for k in p)))
    jobs, baselines = [], {}
    for index, (point, seed) in enumerate(itertools.product(points, spec["seeds"])):
        sample = f"r{index // len(spec['seeds'])}__" if spec.get("random") else ""
        axes = [f"{k}={format_value(v)}" for k, v in point.items()]
        tags = [f"{names[k]}={_label(v)}" for k, v in point.items()] + [f"seed={seed}"]
        jobs.append(
            Job(
                job_key(point, names, seed, sample),
                spec["name"],
                config,
                fixed + axes + [f"seed={seed}"] + extra,
                tags,
                group=spec["name"],
            )
        )
        if spec["baseline"]:
            job = _baseline_job(spec, point, names, seed, fixed, extra, config, repo)
            baselines.setdefault(job.key, job)
    return spec, jobs + list(baselines.values())


def _baseline_job(spec, point, names, seed, fixed, extra, config, repo) -> Job:
    base = spec["baseline"]
    kept = {k: v for k, v in point.items() if any(k.startswith(p) for p in base["keep"])}
    axes = [f"{k}={format_value(v)}" for k, v in kept.items()]
    tags = ["baseline"] + [f"{names[k]}={_label(v)}" for k, v in kept.items()] + [f"seed={seed}"]
    overrides = fixed + axes + list(base["overrides"]) + [f"seed={seed}"] + list(extra)
    key = job_key(kept, names, seed, prefix="baseline__")
    return Job(
        key,
        spec["name"],
        _abs(base["config"], repo) or config,
        overrides,
        tags,
        baseline=True,
        group=spec["name"],
    )


def single_job(config: str | None, extra: list[str], cluster: list[str] = ()) -> Job:
    """One run from the command line; its key is run.id=... if given, else a timestamp."""
    given = [o.split("=", 1)[1] for o in extra if o.startswith("run.id=")]
    key = given[-1] if given else datetime.now().strftime("%Y%m%d-%H%M%S")
    return Job(
        key, None, str(Path(config).resolve()) if config else None, list(cluster) + list(extra)
    )
