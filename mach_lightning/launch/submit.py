"""Validate every job, then submit the ones not finished or running, as one submitit job array.

Each job becomes a `TrainTask` with a fixed run directory `<run.root>/<name>/<key>`, `resume=true`,
and the profile's allocation as trainer settings. Per-job stdout/stderr stay in submitit's folder
(`<run.root>/<name>/.submitit/`, one per sweep) and are linked from `<run_dir>/logs/`; every
submission is recorded in `<run_dir>/launch.json`, which `status` reads.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from mach_lightning.launch import preflight
from mach_lightning.launch.profiles import ClusterProfile
from mach_lightning.launch.status import (
    LAUNCH,
    UNKNOWN,
    UNREADABLE,
    job_state,
    read_launch,
    squeue_states,
)
from mach_lightning.launch.sweep import Job, SweepError, format_value
from mach_lightning.launch.sweep_spec import load_registries
from mach_lightning.launch.task import TrainTask

COMPARE_IGNORE = ("name", "run", "logger", "resume", "ckpt_path")


def _load(job: Job, index: int, total: int, label: str):
    from mach_lightning.config import ConfigError, load_config

    try:
        return load_config(job.config, job.overrides)
    except ConfigError as err:
        raise SweepError(
            f"{label}: job {index + 1} of {total} '{job.key}' is invalid, so nothing "
            f"was submitted. {err}"
        ) from None


def _placement(job: Job, profile: ClusterProfile) -> None:
    job.overrides += profile.trainer_overrides()
    if job.name:
        job.overrides.append(f"name={job.name}")
    job.overrides += [f"run.id={job.key}", "resume=true"]


def _logging(job: Job, cfg) -> None:
    root = Path(cfg.run.root).resolve()
    job.overrides.append(f"run.root={root}")
    # The folder the preflight checked, whatever the job's working directory on the cluster.
    job.overrides.append(f"data.root={preflight.data_root(cfg)}")
    if job.group:
        job.overrides.append(f"logger.wandb.group={job.group}")
    job.overrides.append(f"logger.wandb.job_type={cfg.topology.name}")
    if job.tags:
        job.overrides.append(
            f"logger.wandb.tags={format_value(list(cfg.logger.wandb.tags) + job.tags)}"
        )
    job.run_dir = root / cfg.name / job.key
    job.topology = cfg.topology.name


def _comparable(cfg) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    return json.dumps({k: v for k, v in data.items() if k not in COMPARE_IGNORE}, sort_keys=True)


def prepare(jobs: list[Job], profile: ClusterProfile, label: str, check: bool = True) -> list[Job]:
    """Validate every job (raising SweepError before anything is submitted), fix its run directory
    and W&B fields, and drop baselines identical to a job of the sweep. `check`: also check what
    the jobs need besides their config (data files, run root, resumed runs: see preflight.py);
    --status, which submits nothing, leaves it out."""
    load_registries()
    kept, seen, pairs = [], {}, []
    for index, job in enumerate(jobs):
        _placement(job, profile)
        cfg = _load(job, index, len(jobs), label)
        _logging(job, cfg)  # adds run.root and W&B strings only: no need to validate again
        comparable = _comparable(cfg)
        if job.baseline and comparable in seen:
            continue  # the sweep already has this sync run
        seen.setdefault(comparable, job)
        kept.append(job)
        pairs.append((job, cfg))
    keys = [j.key for j in kept]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise SweepError(
            f"{label}: several jobs share the run id(s) {', '.join(duplicates)}; "
            "give the axes distinct values. Nothing was submitted."
        )
    if check:
        preflight.check(pairs, label)
    return kept


def plan(jobs: list[Job], queue: dict | None = None) -> list[tuple[Job, str]]:
    """(job, what to do): 'submit' for missing, failed or lost runs; 'skip: ...' for the rest.
    A job whose state is unknown (squeue did not answer) or whose files cannot be read is never
    resubmitted: it may still be running, and a second copy would write into its directory."""
    queue = squeue_states() if queue is None else queue
    out = []
    for job in jobs:
        state, job_id, detail = job_state(job.run_dir, queue)
        if state == "FINISHED":
            out.append((job, "skip: finished"))
        elif state in ("MISSING", "FAILED", "LOST"):
            out.append((job, "submit" if state == "MISSING" else f"submit (was {state.lower()})"))
        elif state == UNKNOWN:
            out.append((job, f"skip: state unknown as {job_id}"))
        elif state == UNREADABLE:
            out.append((job, "skip: unreadable"))
            print(
                f"warning: {job.key}: {detail}; not resubmitted (fix or remove it)", file=sys.stderr
            )
        else:
            out.append((job, f"skip: {state.lower()} as {job_id}"))
    unknown = sum(action.startswith("skip: state unknown") for _, action in out)
    if unknown:
        print(f"warning: {queue.error}; {unknown} job(s) not resubmitted", file=sys.stderr)
    return out


def make_executor(profile: ClusterProfile, folder: Path, job_name: str) -> submitit.Executor:
    if profile.executor == "local":
        executor = submitit.LocalExecutor(
            folder, max_num_timeout=profile.max_timeouts, python=profile.python
        )
        executor.update_parameters(
            timeout_min=profile.time_min, tasks_per_node=1, signal_delay_s=profile.signal_delay_s
        )
        return executor
    executor = submitit.SlurmExecutor(
        folder, max_num_timeout=profile.max_timeouts, python=profile.python
    )
    executor.update_parameters(**profile.slurm_parameters(job_name))
    return executor


# Parameters of SlurmExecutor.update_parameters that are no sbatch option of the same name.
_NOT_SBATCH = {"signal_delay_s", "array_parallelism", "additional_parameters", "setup", "srun_args"}


def sbatch_script(profile: ClusterProfile, folder: Path, job_name: str, count: int) -> str:
    """The sbatch lines asked of submitit for `count` jobs (an array when count > 1), written as
    submitit writes them: from the parameters given to its public `update_parameters`. submitit
    renders its own file only when it submits, with a private helper this code does not rely on
    (mach_lightning/internals.py says why); its file also names the log files (--output,
    --error, --open-mode) and passes them to srun."""
    params = profile.slurm_parameters(job_name)
    options = {k: v for k, v in params.items() if k not in _NOT_SBATCH}
    options["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{params['signal_delay_s']}"
    if count > 1:
        options["array"] = f"0-{count - 1}%{min(count, params['array_parallelism'])}"
    options.update(params.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [_sbatch_flag(key, options[key]) for key in sorted(options)]
    if params.get("setup"):
        lines += ["", "# setup", *params["setup"]]
    python = profile.python or shlex.quote(sys.executable)
    srun = shlex.join(["srun", "--unbuffered", *params.get("srun_args", [])])
    command = f"{srun} {python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return "\n".join([*lines, "", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""])


def _sbatch_flag(key: str, value) -> str:
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def _record(job: Job, sjob, profile: ClusterProfile, folder: Path) -> None:
    """launch.json (appending this submission) and logs/ links to submitit's per-task files."""
    run_dir = job.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    tasks = range(profile.world_size if profile.executor == "slurm" else 1)
    paths = [submitit.core.utils.JobPaths(folder, sjob.job_id, t) for t in tasks]
    for p in paths:
        for src in (p.stdout, p.stderr):
            link = run_dir / "logs" / src.name
            if not link.is_symlink():
                link.symlink_to(src)
    record = read_launch(run_dir)
    record.update(key=job.key, config=job.config, overrides=job.overrides)
    record.setdefault("submissions", []).append(
        {
            "job_id": sjob.job_id,
            "executor": profile.executor,
            "cluster": profile.name,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "folder": str(folder),
            "stdout": [str(p.stdout) for p in paths],
            "stderr": [str(p.stderr) for p in paths],
        }
    )
    tmp = run_dir / f".{LAUNCH}.tmp"  # replaced whole: status never reads half a file
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / LAUNCH)


def submit(jobs: list[Job], profile: ClusterProfile, job_name: str) -> list:
    """Submit jobs (already prepared) as one array; returns submitit jobs in the same order."""
    if not jobs:
        return []
    folder = jobs[0].run_dir.parent / ".submitit"
    if profile.executor == "local":
        return _run_local(jobs, profile, folder, job_name)
    executor = make_executor(profile, folder, job_name)
    tasks = [TrainTask(j.config, j.overrides, str(j.run_dir)) for j in jobs]
    with executor.batch():
        sjobs = [executor.submit(t) for t in tasks]
    for job, sjob in zip(jobs, sjobs):
        _record(job, sjob, profile, folder)
    return sjobs


def _run_local(jobs: list[Job], profile: ClusterProfile, folder: Path, job_name: str) -> list:
    """The local executor, `profile.parallel` jobs at a time; returns when all have ended."""
    executor = make_executor(profile, folder, job_name)
    sjobs, running = [], []
    for job in jobs:
        while len(running) >= profile.parallel:
            running = [s for s in running if not s.done()]
            time.sleep(0.5)
        sjob = executor.submit(TrainTask(job.config, job.overrides, str(job.run_dir)))
        _record(job, sjob, profile, folder)
        print(f"started {job.key} (pid {sjob.job_id})", flush=True)
        sjobs.append(sjob)
        running.append(sjob)
    while any(not s.done() for s in sjobs):
        time.sleep(0.5)
    return sjobs
