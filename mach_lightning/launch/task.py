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
step it resumes from, requeue, end with the world size, error, preempted) and a failure leaves its
traceback in `<run_dir>/error.txt`: `sweeps/launch.py --status` reads both.

A requeue is not a failure, although it ends the attempt with an exception: rank 0 leaves by
submitit's SystemExit, and under DDP the other ranks by Slurm's SIGTERM or by the next collective,
whose peer is gone ("Connection closed by peer"). So an attempt that stops after a `requeue`
event (rank 0 writes it in `checkpoint()`, before submitit requeues and exits) records nothing
more; one stopped by a signal without a requeue (Slurm's own preemption, scancel) records a
`preempted` event; only the rest is an `error`, with error.txt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from submitit.core.utils import UncompletedJobError
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
    from mach_lightning import runs  # here: runs imports Lightning, the launcher need not

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    runs.log_run_event(run_dir, event, rank=rank(), **fields)


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill mid-write: the others still count
        if isinstance(event, dict):
            events.append(event)
    return events


_received: dict[str, float] = {}  # signal name -> when this process first received it


def _preempt_signal() -> int:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # submitit's own setting
    return getattr(signal, f"SIG{name}", signal.SIGUSR2)


def watch_signals() -> None:
    """Note the preemption signal and SIGTERM when they arrive, then run the handler already
    installed (submitit's). Only installed handlers are wrapped, never a default action, so
    outside submitit a SIGTERM still ends the process."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    for signum in {_preempt_signal(), signal.SIGTERM}:
        previous = signal.getsignal(signum)
        if callable(previous) and not getattr(previous, "notes_signal", False):
            signal.signal(signum, _noting(previous))


def _noting(previous):
    def handler(signum, frame):
        _received.setdefault(signal.Signals(signum).name, time.time())
        previous(signum, frame)

    handler.notes_signal = True
    return handler


def stop_cause(run_dir: Path, error: BaseException, since: float) -> str | None:
    """Why the attempt started at `since` ended with `error`, when it is not a failure of its
    own: 'requeue' (a rank logged `requeue` since), a signal's name (Slurm stopped the job), or
    None: a failure. Under DDP, Lightning's SIGTERM handler can raise before the handler that
    notes the signal runs; the requeue event covers those ranks."""
    if isinstance(error, UncompletedJobError):
        return None  # submitit would not requeue (timed out too often): the job is over
    events = read_events(run_dir)
    if any(e.get("event") == "requeue" and e.get("time", 0) >= since for e in events):
        return "requeue"
    if _received:
        return min(_received, key=_received.get)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    # 143 = 128 + SIGTERM: how run_fit's own SIGTERM stop exits
    if isinstance(error, SIGTERMException) or (isinstance(error, SystemExit) and error.code == 143):
        return "SIGTERM"
    return None


def _checkpoint_step(run_dir: Path) -> int | None:
    """The batch step saved in <run_dir>/checkpoints/last.ckpt (None: none there, or rank > 0)."""
    path = run_dir / "checkpoints" / "last.ckpt"
    if rank() != 0 or not path.is_file():
        return None
    from mach_lightning.checkpoint_io import CheckpointError, load_checkpoint

    try:  # mmap: the tensors stay on disk, only the small bookkeeping is read
        state = load_checkpoint(path, mmap=True)
    except CheckpointError:  # run_fit refuses the same file next, inside the try that logs errors
        return None
    return int(state.get("topology_state", {}).get("batch_step", state.get("global_step", 0)))


def _schema_has(key: str) -> bool:
    from omegaconf import OmegaConf

    from mach_lightning.config import Config

    return OmegaConf.select(OmegaConf.structured(Config), key, default="<absent>") != "<absent>"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def record_stop(run_dir: Path, error: BaseException, since: float) -> str | None:
    """An error leaves error.txt and an `error` event; a requeue nothing more than the
    `requeue` event checkpoint() wrote; another signal a `preempted` event. Returns the
    stop's cause (see stop_cause), or None: an error, or an exit that is neither."""
    cause = stop_cause(run_dir, error, since)
    if cause and cause != "requeue":
        log_event(run_dir, "preempted", signal=cause, slurm=slurm_info())
    if cause or not isinstance(error, Exception):
        return cause  # (else: sys.exit or Ctrl-C inside the task, not a failure of the run)
    text = "".join(traceback.format_exception(error))
    (run_dir / ERROR).write_text(f"rank {rank()} ({socket.gethostname()}):\n" + text)
    log_event(run_dir, "error", error=text.strip().splitlines()[-1])


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
        import mach_lightning.data  # noqa: F401  (load_config needs the registries filled)
        import mach_lightning.methods  # noqa: F401
        from mach_lightning.config import load_config
        from mach_lightning.training import run_fit  # fit.py: the command line over it

        run_dir = Path(self.run_dir)
        since = time.time()
        _received.clear()
        watch_signals()
        log_event(run_dir, "start", resume_step=_checkpoint_step(run_dir), slurm=slurm_info())
        try:
            cfg = load_config(self.config, self.overrides + self.job_overrides())
            result = run_fit(cfg)
        except BaseException as error:
            cause = record_stop(run_dir, error, since)
            if cause and isinstance(error, Exception):
                # A consequence of the stop (a peer gone), not a failure: leave as submitit's
                # requeue exit does, without a traceback in the job's log or an error result.
                code = -1 if cause == "requeue" else 128 + signal.Signals[cause]
                raise SystemExit(code) from error
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
