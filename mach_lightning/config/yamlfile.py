"""YAML files (configs, sweeps, cluster profiles) read with errors that name the file and line.

A syntax error becomes one line such as `sweeps/x.yaml is not valid YAML: line 4, column 6: did
not find expected ',' or ']' (while parsing a flow sequence at line 3, column 6)`, raised as the
caller's own error class so each command line reports it like its other user errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where (1-based line and column), what, and inside what."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return " ".join(str(err).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    context, at = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and at is not None:
        text += f" ({context} at line {at.line + 1}, column {at.column + 1})"
    return text


def load_yaml(path: Path, error: type[Exception], what: str) -> Any:
    """OmegaConf.load, a syntax error raised as `error` naming the file, the line and the column."""
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise error(
            f"{what} '{path}' is not valid YAML: {yaml_problem(err)}. Check the indentation, "
            "colons, quotes and brackets there (a list is [a, b] or one '- item' per line)."
        ) from None


def line_of(path: str | Path, *keys: str) -> int | None:
    """The 1-based line of a key in a YAML file (nested keys: one after another), else None.

    OmegaConf drops positions when it loads a file, so a value that is valid YAML but not a valid
    setting (seeds: [a]) is located again from the file's node tree to point at the line."""
    try:
        node = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return line
        match = next(((k, v) for k, v in node.value if k.value == key), None)
        if match is None:
            return line
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def where(path: str | Path, *keys: str) -> str:
    """`file, line N` for error messages (just the file when the key cannot be found)."""
    line = line_of(path, *keys) if keys else None
    return f"{path}, line {line}" if line else str(path)


def nearest_file(name: str, candidates: list[Path]) -> Path | None:
    """The candidate whose name is closest to `name`, comparing stems (`seq` finds seq.yaml)."""
    by_stem = {p.stem: p for p in candidates}
    close = difflib.get_close_matches(Path(name).stem, list(by_stem), n=1, cutoff=0.6)
    return by_stem[close[0]] if close else None


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
