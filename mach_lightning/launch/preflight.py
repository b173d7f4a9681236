"""What a job needs besides a valid config, checked here before anything is submitted.

Without these checks a sweep whose data is missing is submitted whole and fails job by job on the
cluster, minutes later. So before submitting, every job's

- data files are found and checked (the data module's own check, with downloads off: the
  launcher never downloads, and many jobs fetching into one folder at once would race);
- run root can be created and written;
- run directory, when the job resumes a checkpoint, was trained with the same settings (the
  job would refuse to resume otherwise: see mach_lightning/resume.py).

Every problem found is reported in one SweepError naming the jobs, what is missing and where it
belongs; nothing is submitted. Jobs run on other machines only see what this one sees through a
shared filesystem, which is how the profiles' paths (e.g. data.root=/datasets) are meant.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from mach_lightning.launch.sweep import Job, SweepError

LISTED = 6  # job names shown per problem; the rest are counted


def check(pairs: list[tuple[Job, object]], label: str) -> None:
    """Raise one SweepError listing every problem of the (job, loaded config) pairs."""
    problems = data_problems(pairs) + root_problems(pairs) + resume_problems(pairs)
    if not problems:
        return
    if len(problems) == 1:
        raise SweepError(f"{label}: nothing was submitted: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    raise SweepError(f"{label}: nothing was submitted, {len(problems)} problems:\n{lines}")


def name_jobs(keys: list[str], total: int) -> str:
    """'job a', 'all 24 jobs (a, b, ... and 18 more)', '2 of 24 jobs (a, b)'."""
    if total == 1:
        return f"job {keys[0]}"
    more = len(keys) - LISTED
    shown = ", ".join(keys[:LISTED]) + (f" and {more} more" if more > 0 else "")
    count = f"all {total} jobs" if len(keys) == total else f"{len(keys)} of {total} jobs"
    return f"{count} ({shown})"


def data_root(cfg) -> Path:
    """The folder the job's dataset resolves data.root to (as the datasets do)."""
    return Path(cfg.data.root).expanduser().resolve()


def data_error(cfg) -> str:
    """Why the job's dataset cannot be loaded ('' when it can): the data module's prepare_data,
    which finds and checks the files, with downloads off."""
    from mach_lightning.data import DataError, create_datamodule

    data = OmegaConf.merge(cfg.data, {"download": False})
    try:
        create_datamodule(data, cfg.seed).prepare_data()
    except (DataError, OSError) as err:
        return str(err)
    return ""


def data_problems(pairs) -> list[str]:
    # Jobs of a sweep share their data: check each dataset and folder once.
    groups: dict[tuple, tuple[object, list[str]]] = {}
    for job, cfg in pairs:
        key = (cfg.data.name, str(data_root(cfg)), bool(cfg.data.verify))
        groups.setdefault(key, (cfg, []))[1].append(job.key)
    problems = []
    for (name, root, _), (cfg, keys) in groups.items():
        error = data_error(cfg)
        if error:
            problems.append(
                f"{name_jobs(keys, len(pairs))} cannot use their data (data.name={name}, "
                f"data.root={root}; the launcher checks the files before submitting and never "
                f"downloads): {error}"
            )
    return problems


def root_problems(pairs) -> list[str]:
    problems = []
    for folder in dict.fromkeys(job.run_dir.parent for job, _ in pairs):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "not a folder" if not existing.is_dir() else "a folder this user cannot write"
            problems.append(
                f"the runs go to {folder}, which cannot be created: {existing} is {what}. "
                "Point run.root at a writable folder."
            )
    return problems


def resume_problems(pairs) -> list[str]:
    """Jobs that would resume a run trained with other settings (finished runs are skipped)."""
    from mach_lightning.config import ConfigError
    from mach_lightning.resume import config_changes

    problems = []
    for job, cfg in pairs:
        saved = _resumed_config(job.run_dir)
        if saved is None:
            continue
        try:
            config_changes(cfg, saved, f"Run {job.run_dir} (its checkpoints/last.ckpt)")
        except ConfigError as err:
            problems.append(f"job '{job.key}' cannot resume: {err}")
    return problems


def _resumed_config(run_dir: Path) -> dict | None:
    """config.yaml of a run this job would resume, None when it starts fresh or is finished
    (a relaunch skips it) or when the file cannot be read (the job checks the checkpoint)."""
    if (run_dir / "result.json").exists() or not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None
