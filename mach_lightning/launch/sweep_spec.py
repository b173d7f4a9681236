"""A sweep file read and checked: its fields, the grid and the random axes as points.

Every problem is a SweepError naming the file and the line of the offending key, with what a valid
value looks like; `mach_lightning.launch.sweep` turns the points into jobs (format: see there).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mach_lightning.config.yamlfile import load_yaml, nearest_file, shown, where

SWEEP_DIR = Path(__file__).resolve().parents[2] / "sweeps"
SWEEP_KEYS = {"name", "description", "config", "overrides", "grid", "random", "seeds", "baseline"}
KEEP_DEFAULT = ["data.", "model.", "optim.", "trainer."]
RANDOM_EXAMPLES = {  # what each kind of random axis looks like, shown in its errors
    "uniform": "{uniform: [0.0, 0.5]}",
    "log_uniform": "{log_uniform: [1.0e-4, 1.0e-2]}",
    "int": "{int: [1, 8]}",
    "choice": "{choice: [adam, sgd]}",
}
RANDOM_KINDS = tuple(RANDOM_EXAMPLES)
RANDOM_FORM = "random: {samples: 4, seed: 0, axes: {optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}"


class SweepError(ValueError):
    """A sweep problem, naming the sweep file or the job and the key; nothing was submitted."""


def load_registries() -> None:
    """Import what a run imports, so topology and dataset names validate as they will in the job
    and load_config composes every method's config section (config imports neither). Here, the
    lowest of the launcher's sweep modules: submit.py imports it from here, so the two do not
    import each other (the layering contract forbids import cycles within a package)."""
    import mach_lightning.data  # noqa: F401
    import mach_lightning.methods  # noqa: F401


def _choices(key: str, source: str) -> list[Any]:
    from mach_lightning.config import CHOICES

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
            f"{where(source, 'grid')}: grid must map keys to value lists (or be a list of such "
            f"maps), e.g. grid: {{topology.name: [delayed, local]}}; got {grid!r}."
        )
    axes = {}
    for key, values in grid.items():
        values = _choices(key, source) if values == "*" else values
        if not isinstance(values, (list, ListConfig)) or not values:
            raise SweepError(
                f"{where(source, 'grid', key)}: grid axis '{key}' needs a non-empty list of "
                f"values or '*', e.g. {key}: [1, 2]; got {values!r}."
            )
        axes[key] = list(values)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is no number


def _axis_problem(kind: str, args: Any) -> str | None:
    """What is wrong with a random axis' arguments, or None."""
    if kind == "choice":
        return None if isinstance(args, list) and args else "a non-empty list of values"
    pair = isinstance(args, list) and len(args) == 2
    numbers = pair and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if kind == "int":
        ok = pair and all(_is_int(a) for a in args) and args[0] <= args[1]
        return None if ok else "[low, high]: two integers with low <= high"
    if kind == "log_uniform":
        ok = numbers and 0 < args[0] <= args[1]
        return None if ok else "[low, high]: two numbers with 0 < low <= high"
    return None if numbers and args[0] <= args[1] else "[low, high]: two numbers with low <= high"


def _check_axis(key: str, spec: Any, source: str) -> None:
    at = where(source, "random", "axes", key)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in RANDOM_KINDS:
        raise SweepError(
            f"{at}: random axis '{key}' must be one of "
            f"{' | '.join(RANDOM_EXAMPLES.values())}; got {spec!r}."
        )
    kind, args = next(iter(spec.items()))
    problem = _axis_problem(kind, args)
    if problem:
        raise SweepError(
            f"{at}: random axis '{key}': {kind} needs {problem}, e.g. "
            f"{key}: {RANDOM_EXAMPLES[kind]}; got {args!r}."
        )


def _draw(rng: random.Random, spec: dict) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(list(args))
    lo, hi = args
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "int":
        return rng.randint(lo, hi)
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_points(spec: Any, source: str) -> list[dict[str, Any]]:
    """`samples` draws of every axis, seeded: the same sweep file gives the same points."""
    if not spec:
        return [{}]
    at = where(source, "random")
    if not isinstance(spec, dict):
        raise SweepError(f"{at}: random must be a mapping, e.g. {RANDOM_FORM}; got {spec!r}.")
    unknown, axes = set(spec) - {"samples", "seed", "axes"}, spec.get("axes")
    if unknown or not isinstance(axes, dict) or not axes:
        raise SweepError(
            f"{at}: random needs samples, seed and a mapping of axes, e.g. {RANDOM_FORM}; "
            f"unknown keys: {', '.join(sorted(unknown)) or 'none'}; axes: {axes!r}."
        )
    samples, seed = spec.get("samples", 1), spec.get("seed", 0)
    if not (_is_int(samples) and samples >= 1 and _is_int(seed)):
        raise SweepError(
            f"{at}: random.samples must be a positive integer and random.seed an integer "
            f"(e.g. samples: 4, seed: 0); got samples: {samples!r}, seed: {seed!r}."
        )
    for key, axis in axes.items():
        _check_axis(key, axis, source)
    rng = random.Random(seed)
    return [{k: _draw(rng, a) for k, a in axes.items()} for _ in range(samples)]


def _baseline_spec(raw: Any, source: str) -> dict | None:
    if raw in (None, False, "none"):
        return None
    if isinstance(raw, str):
        return {"config": None, "overrides": [f"topology.name={raw}"], "keep": KEEP_DEFAULT}
    if not isinstance(raw, dict) or set(raw) - {"config", "overrides", "keep"}:
        raise SweepError(
            f"{where(source, 'baseline')}: baseline must be a topology name (e.g. sync) or "
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
        sweeps = sorted(SWEEP_DIR.glob("*.yaml"))
        near = nearest_file(path.name, sweeps)
        hint = f" Did you mean {shown(near)}?" if near else ""
        raise SweepError(
            f"Sweep file '{path}' does not exist.{hint} Sweeps in {shown(SWEEP_DIR)}/: "
            f"{', '.join(p.name for p in sweeps)}."
        )
    raw = load_yaml(path, SweepError, "Sweep file")
    if not isinstance(raw, DictConfig):
        raise SweepError(f"Sweep file '{path}' must hold a mapping (name, config, grid, seeds...).")
    try:
        spec = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as err:  # e.g. an ${interpolation} that does not resolve
        raise SweepError(f"Sweep file '{path}': {str(err).splitlines()[0]}.") from None
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(
            f"Sweep file '{path}': unknown key(s) {', '.join(sorted(unknown))}. "
            f"Valid keys: {', '.join(sorted(SWEEP_KEYS))}."
        )
    _check_fields(spec, str(path))
    spec.setdefault("name", path.stem)
    spec["seeds"] = spec.get("seeds") or [0]
    spec["baseline"] = _baseline_spec(spec.get("baseline", "sync"), str(path))
    return spec


def _check_fields(spec: dict, source: str) -> None:
    """The sweep's own fields have the shapes expansion relies on (the axes are checked there)."""
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(_is_int(s) for s in seeds)):
        raise SweepError(
            f"{where(source, 'seeds')}: seeds must be a list of integers, e.g. seeds: [0, 1, 2]; "
            f"got {seeds!r}."
        )
    overrides = spec.get("overrides")
    if overrides is not None and not isinstance(overrides, list):
        raise SweepError(
            f"{where(source, 'overrides')}: overrides must be a list of key=value strings, e.g. "
            f"overrides: [data.name=mnist, model.num_components=4]; got {overrides!r}."
        )
    config = spec.get("config")
    if config is not None and not isinstance(config, str):
        raise SweepError(
            f"{where(source, 'config')}: config must be the path of one experiment file, e.g. "
            f"config: configs/sync.yaml; got {config!r}."
        )
