"""The coordinator of a `runtime.name=dist` run: the store, one process per component, the end.

It opens the c10d TCPStore every link is built from (the control plane), starts one worker
process per component (dist/worker.py), watches them, and when all have finished merges their
metrics into the run's rows and their weights into one state_dict for evaluation (training.py
evaluates and writes result.json as for a simulated run). When a process fails it stops the
others (only the processes it started, by their id) and raises `DistError` naming the component
that failed or hung, with its last lines of output.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mach_lightning.dist.checkpoint import common_step
from mach_lightning.dist.worker import EXIT_PEER, component_dir


class DistError(RuntimeError):
    """A component process failed or hung; the message names it and says why."""


@dataclass
class DistResult:
    steps: int
    rows: list[dict]  # the merged training rows, by step
    state: dict[str, torch.Tensor]  # every process's weights, merged
    seconds: float
    epochs: list[dict]  # per validation epoch: epoch, step, elapsed_s, merged state (in order)


def processes_of(rule) -> int:
    return 1 + max(rule.process_of(n.index) for n in rule.nodes())


def resume_step(run_dir: Path, rule) -> int | None:
    """The latest step every component process of the run saved a checkpoint at."""
    dirs = [component_dir(run_dir, k) for k in range(processes_of(rule))]
    return common_step(dirs) if all(d.is_dir() for d in dirs) else None


def run_components(cfg, run_dir: Path, rule, resume: int | None = None) -> DistResult:
    """Start (from checkpoint step `resume`, if given), watch and collect one process per
    component; raises DistError on a failure."""
    world, start = processes_of(rule), time.monotonic()
    r = cfg.runtime
    store = dist.TCPStore(
        r.host, int(r.port), is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=float(r.timeout_s)),
    )  # fmt: skip
    address = f"{r.host}:{store.port}"
    procs = [_start(run_dir, rank, world, address, resume) for rank in range(world)]
    if resume is not None:
        print(f"dist: resuming every component process from step {resume}", flush=True)
    k = int(cfg.model.num_components)
    extra = f", c{k}-c{world - 1} the synthesizers'" if world > k else ""  # synthesizer=oracle
    print(f"dist: {world} processes (c0-c{k - 1} the components'{extra}; logs: "
          f"{run_dir}/components/c*/log.txt)", flush=True)  # fmt: skip
    try:
        _watch(procs, run_dir, float(r.timeout_s), Progress(store, world, cfg.trainer.max_steps))
    finally:
        _stop(procs)
    collected = [torch.load(component_dir(run_dir, k) / "weights.pt") for k in range(world)]
    state = {key: value for c in collected for key, value in c["state"].items()}
    rows = merge_rows([component_dir(run_dir, k) / "metrics.csv" for k in range(world)])
    epochs = merge_epochs([component_dir(run_dir, k) for k in range(world)])
    return DistResult(collected[0]["step"], rows, state, time.monotonic() - start, epochs)


def merge_epochs(dirs: list[Path]) -> list[dict]:
    """Each epoch every process saved its weights at: one model, reached when the last got
    there."""
    merged = []
    names = sorted((p.name for p in dirs[0].glob("epochs/e*.pt")), key=lambda n: int(n[1:-3]))
    for name in names:
        parts = [torch.load(d / "epochs" / name) for d in dirs if (d / "epochs" / name).is_file()]
        if len(parts) < len(dirs):
            continue
        state = {key: value for part in parts for key, value in part["state"].items()}
        elapsed = max(part["elapsed_s"] for part in parts)
        merged.append({"epoch": parts[0]["epoch"], "step": parts[0]["step"],
                       "elapsed_s": elapsed, "state": state})  # fmt: skip
    return merged


def _start(run_dir: Path, rank: int, world: int, store: str, resume: int | None):
    out = component_dir(run_dir, rank)
    out.mkdir(parents=True, exist_ok=True)
    stale = ["error.json", "weights.pt"]  # an earlier attempt's
    if resume is None:  # a fresh start: its rows, epochs and checkpoints too
        stale += ["metrics.csv", *out.glob("epochs/e*.pt"), *out.glob("ckpt/s*.pt")]
    for path in stale:
        (out / path).unlink(missing_ok=True)
    log = open(out / "log.txt", "a" if resume is not None else "w")  # noqa: SIM115
    command = [sys.executable, "-m", "mach_lightning.dist.worker", "--run-dir", str(run_dir)]
    command += ["--rank", str(rank), "--world", str(world), "--store", store]
    command += ["--parent", str(os.getpid())]
    if resume is not None:
        command += ["--resume-step", str(resume)]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


class Progress:
    """A line every `every_s` seconds: the steps each component process has reached."""

    def __init__(self, store, world: int, max_steps: int, every_s: float = 10.0):
        self.store, self.world, self.max_steps, self.every_s = store, world, max_steps, every_s
        self.next = time.monotonic() + every_s

    def report(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every_s
        keys = [f"progress/{k}" for k in range(self.world)]
        steps = [int(self.store.get(k)) if self.store.check([k]) else 0 for k in keys]
        total = f"/{self.max_steps}" if self.max_steps > 0 else ""
        print("dist: steps " + ", ".join(f"c{k} {s}{total}" for k, s in enumerate(steps)))


def _watch(procs, run_dir: Path, timeout_s: float, progress: Progress | None = None) -> None:
    """Until every process has exited 0; the first failure raises, naming the culprit."""
    while True:
        if progress is not None:
            progress.report()
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return
        failed = [k for k, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            time.sleep(min(1.0, timeout_s))  # let the others report what they saw
            raise DistError(_explain(procs, run_dir, timeout_s))
        time.sleep(0.05)


def _explain(procs, run_dir: Path, timeout_s: float) -> str:
    """Who failed first on its own, or who the others were waiting on."""
    errors = {k: _error(run_dir, k) for k in range(len(procs))}
    codes = [p.poll() for p in procs]
    own = [k for k, c in enumerate(codes) if c not in (None, 0, EXIT_PEER)]
    exited = [k for k, c in enumerate(codes) if c]
    culprit = own[0] if own else exited[0]
    seen, waiter = set(), None  # follow who waited on whom to the one that waited on no one
    while "peer" in errors.get(culprit, {}) and culprit not in seen:
        seen.add(culprit)
        waiter, culprit = culprit, int(errors[culprit]["peer"])
    code = codes[culprit]
    how = (
        f"exited with code {code}" if code is not None and code >= 0
        else f"was killed by signal {-code}" if code is not None
        else f"stopped answering (the others waited runtime.timeout_s={timeout_s:g} s for it)"
    )  # fmt: skip
    why = errors[culprit].get("message") or _tail(component_dir(run_dir, culprit) / "log.txt")
    if waiter is not None:  # what the one that gave up on it saw (the culprit may have ended well)
        why += f" Component process {waiter} reported: {errors[waiter]['message']}"
    return (
        f"component process {culprit} (pid {procs[culprit].pid}) {how}; the run stopped and "
        f"the other processes were ended. {why}\nIts output: "
        f"{component_dir(run_dir, culprit) / 'log.txt'}"
    )


def _error(run_dir: Path, rank: int) -> dict:
    path = component_dir(run_dir, rank) / "error.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "Last lines: " + " | ".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """End the processes this coordinator started that still run: SIGTERM, then SIGKILL."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def merge_rows(paths: list[Path]) -> list[dict]:
    """The components' metrics.csv files as one row per step (a step's columns united)."""
    by_step: dict[int, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                step = int(float(row.pop("step")))
                values = {k: float(v) for k, v in row.items() if v not in ("", None)}
                by_step.setdefault(step, {}).update(values)
    return [{"step": s, **by_step[s]} for s in sorted(by_step)]
