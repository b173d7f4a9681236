"""`TrainTask`: what every launched job runs, requeueable through submitit.

Who handles preemption and time limits: submitit, alone. Slurm sends USR2 `signal_delay_s` before
the limit (or `scancel --signal=USR2` does); submitit's handler on rank 0 calls `checkpoint()`,
which only returns this same task to run again, then `scontrol requeue`s the job and exits.
Nothing is saved inside the signal handler (under DDP only rank 0 runs it, and a collective save
there deadlocks): `run_fit` writes `last.ckpt` periodically (`run.checkpoint_every_n_steps`) and
at epoch ends, from every rank. The task always runs with a fixed run directory (`run.id` = the
job key) and `resume=true`, so any restart of the job, whether requeued by submitit, by Slurm's
own preemption or node-failure requeue, or relaunched by hand, continues from its `last.ckpt`.

Each rank appends one JSON line per event to `<run_dir>/events.jsonl` (start with the checkpoint
step it resumes from, requeue, end with the world size, error) and a failure leaves its traceback
in `<run_dir>/error.txt`: `sweeps/launch.py --status` reads both.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

EVENTS = "events.jsonl"
ERROR = "error.txt"


def slurm_info() -> dict[str, Any]:
    """This process's place in its Slurm job (empty outside Slurm), e.g. for the W&B config."""
    names = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "restart_count": "SLURM_RESTART_COUNT",
        "nodelist": "SLURM_JOB_NODELIST",
        "ntasks": "SLURM_NTASKS",
        "procid": "SLURM_PROCID",
    }
    info = {k: os.environ[v] for k, v in names.items() if v in os.environ}
    if "array_job_id" in info and "array_task_id" in info:
        info["job"] = f"{info['array_job_id']}_{info['array_task_id']}"  # what squeue shows
    elif "job_id" in info:
        info["job"] = info["job_id"]
    return info


def rank() -> int:
    for var in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def log_event(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one line to <run_dir>/events.jsonl (small appends from several ranks stay whole)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"event": event, "time": time.time(), "rank": rank(), "host": socket.gethostname()}
    record.update(fields)
    with open(run_dir / EVENTS, "a") as file:
        file.write(json.dumps(record, default=str) + "\n")


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoint_step(run_dir: Path) -> int | None:
    """The batch step saved in <run_dir>/checkpoints/last.ckpt (None: none there, or rank > 0)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if rank() != 0 or not path.is_file():
        return None
    import torch

    # mmap: the tensors stay on disk, only the small bookkeeping is read
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("topology_state", {}).get("batch_step", state.get("global_step", 0)))


def _schema_has(key: str) -> bool:
    from omegaconf import OmegaConf

    from mach_lightning.config import Config

    return OmegaConf.select(OmegaConf.structured(Config), key, default="<absent>") != "<absent>"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TrainTask(Checkpointable):
    """Runs `run_fit` on one validated job; `checkpoint()` makes submitit requeue it unchanged."""

    def __init__(self, config: str | None, overrides: list[str], run_dir: str):
        self.config = config
        self.overrides = list(overrides)  # include run.id=<key> and resume=true
        self.run_dir = run_dir

    def job_overrides(self) -> list[str]:
        """The Slurm job id (which survives requeues) goes to W&B: as a tag, and as the config
        value `run.slurm_job_id` when the schema has that key."""
        job = slurm_info().get("job")
        if not job:
            return []
        tags = [o for o in self.overrides if o.startswith("logger.wandb.tags=")]
        current = tags[-1].split("=", 1)[1].strip("[]") if tags else ""
        extra = [f"logger.wandb.tags=[{current + ',' if current else ''}slurm-{job}]"]
        if _schema_has("run.slurm_job_id"):
            extra.append(f"run.slurm_job_id='{job}'")
        return extra

    def __call__(self) -> dict:
        from mach_lightning.config import load_config
        from mach_lightning.fit import run_fit

        run_dir = Path(self.run_dir)
        info = slurm_info()
        log_event(run_dir, "start", resume_step=_checkpoint_step(run_dir), slurm=info)
        try:
            cfg = load_config(self.config, self.overrides + self.job_overrides())
            result = run_fit(cfg)
        except Exception:
            (run_dir / ERROR).write_text(
                f"rank {rank()} ({socket.gethostname()}):\n" + traceback.format_exc()
            )
            log_event(run_dir, "error", error=traceback.format_exc().strip().splitlines()[-1])
            raise
        log_event(run_dir, "end", world_size=_world_size(), metrics=result.get("metrics", {}))
        if rank() == 0 and (run_dir / ERROR).is_file():
            (run_dir / ERROR).unlink()  # an earlier attempt's error, now resolved
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on rank 0 when the job is signalled: requeue the same task.
        Saves nothing here (see the module docstring); the restart resumes from last.ckpt."""
        log_event(Path(self.run_dir), "requeue", slurm=slurm_info())
        return DelayedSubmission(self, *args, **kwargs)
