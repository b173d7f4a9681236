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
resolved config is already one of the sweep's jobs.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

SWEEP_KEYS = {"name", "description", "config", "overrides", "grid", "random", "seeds", "baseline"}
KEEP_DEFAULT = ["data.", "model.", "optim.", "trainer."]
RANDOM_KINDS = ("uniform", "log_uniform", "int", "choice")


class SweepError(ValueError):
    """A sweep problem, naming the sweep file or the job and the key; nothing was submitted."""


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


def _choices(key: str, source: str) -> list[Any]:
    from mach_lightning.config import CHOICES
    from mach_lightning.launch.submit import load_registries

    load_registries()  # topologies and datasets register their names on import

    if key not in CHOICES:
        raise SweepError(
            f"{source}: grid axis {key}: '*' only works for keys with a fixed choice "
            f"list ({', '.join(sorted(CHOICES))})."
        )
    return list(CHOICES[key]())


def grid_points(grid: Any, source: str) -> list[dict[str, Any]]:
    """Every combination of the axes; a list of grids gives the union of their combinations."""
    if isinstance(grid, (list, ListConfig)):
        return [p for part in grid for p in grid_points(part, source)]
    if not isinstance(grid, dict):
        raise SweepError(
            f"{source}: grid must map keys to value lists (or be a list of such maps)."
        )
    axes = {}
    for key, values in grid.items():
        values = _choices(key, source) if values == "*" else values
        if not isinstance(values, (list, ListConfig)) or not values:
            raise SweepError(
                f"{source}: grid axis '{key}' needs a non-empty list of values or '*'."
            )
        axes[key] = list(values)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _draw(rng: random.Random, key: str, spec: Any, source: str) -> Any:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in RANDOM_KINDS:
        raise SweepError(
            f"{source}: random axis '{key}' must be one of "
            f"{{{' | '.join(f'{k}: ...' for k in RANDOM_KINDS)}}}, got {spec}."
        )
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(list(args))
    lo, hi = args
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "int":
        return rng.randint(int(lo), int(hi))
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_points(spec: dict | None, source: str) -> list[dict[str, Any]]:
    if not spec:
        return [{}]
    unknown = set(spec) - {"samples", "seed", "axes"}
    if unknown or not spec.get("axes"):
        raise SweepError(
            f"{source}: random needs {{samples: N, seed: S, axes: {{key: spec}}}}; "
            f"unknown keys: {', '.join(sorted(unknown)) or 'none'}."
        )
    rng = random.Random(spec.get("seed", 0))
    return [
        {k: _draw(rng, k, s, source) for k, s in spec["axes"].items()}
        for _ in range(int(spec.get("samples", 1)))
    ]


def _baseline_spec(raw: Any, source: str) -> dict | None:
    if raw in (None, False, "none"):
        return None
    if isinstance(raw, str):
        return {"config": None, "overrides": [f"topology.name={raw}"], "keep": KEEP_DEFAULT}
    if not isinstance(raw, dict) or set(raw) - {"config", "overrides", "keep"}:
        raise SweepError(
            f"{source}: baseline must be a topology name (e.g. sync) or "
            f"{{config: ..., overrides: [...], keep: [prefixes]}}."
        )
    return {
        "config": raw.get("config"),
        "overrides": list(raw.get("overrides") or []),
        "keep": list(raw.get("keep") or KEEP_DEFAULT),
    }


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"Sweep file '{path}' does not exist (sweeps/*.yaml are examples).")
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise SweepError(f"Sweep file '{path}' must hold a mapping (name, config, grid, seeds...).")
    spec = OmegaConf.to_container(raw, resolve=True)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(
            f"Sweep file '{path}': unknown key(s) {', '.join(sorted(unknown))}. "
            f"Valid keys: {', '.join(sorted(SWEEP_KEYS))}."
        )
    spec.setdefault("name", path.stem)
    spec["seeds"] = [int(s) for s in spec.get("seeds") or [0]]
    spec["baseline"] = _baseline_spec(spec.get("baseline", "sync"), str(path))
    return spec


def _abs(config: str | None, base: Path) -> str | None:
    if not config:
        return None
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (base / path).exists():
        path = base / path  # relative to the sweep file's repository
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
    points = [
        {**g, **r}
        for g in grid_points(spec.get("grid") or {}, source)
        for r in random_points(spec.get("random"), source)
    ]
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
