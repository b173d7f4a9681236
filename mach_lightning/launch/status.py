"""Job states without Slurm accounting: the run directory first, then `squeue`.

Without slurmdbd, `sacct` (which submitit's own `job.state` uses) knows nothing and submitit says
UNKNOWN. So the truth here is, in order: a valid `result.json` in the run directory (finished),
the job id recorded in `launch.json` as `squeue` shows it (queued, running, requeued; ended jobs
stay visible for the cluster's MinJobAge), a local job's process, and otherwise `error.txt`
(failed, with the error the task recorded) or nothing (lost: the job ended without a result,
e.g. killed).

When `squeue` cannot answer (controller unreachable, not installed) a Slurm job's state is
UNKNOWN, never FAILED: a relaunch must not resubmit a job that may still be running. A file of
the run directory that cannot be parsed (a truncated result.json or launch.json) makes the run
UNREADABLE, listed with the file and what is wrong, instead of stopping the whole listing.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mach_lightning.launch.task import ERROR, read_events

RESULT = "result.json"
LAUNCH = "launch.json"
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}
ENDED_BADLY = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
UNKNOWN, UNREADABLE = "UNKNOWN", "UNREADABLE"
METRIC_ORDER = ("test/acc", "val/acc")
SQUEUE = ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"]


@dataclass
class Row:
    key: str
    state: str  # FINISHED | an squeue state | FAILED | LOST | MISSING | UNKNOWN | UNREADABLE
    job_id: str
    step: str
    metric: str
    run_dir: str
    detail: str = ""  # a failed job's error, a running one's restarts, why UNKNOWN/UNREADABLE

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class Queue(dict):
    """squeue's answer, {job id (array tasks as 12_3): state}; `error` says why there is none."""

    def __init__(self, states: dict[str, str] | None = None, error: str = ""):
        super().__init__(states or {})
        self.error = error


class Unreadable(ValueError):
    """A file of a run directory that exists but cannot be parsed."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path.name}: {why}")
        self.path, self.why = path, why


def squeue_states() -> Queue:
    """Every job squeue knows; an empty Queue with `error` set when squeue did not answer."""
    try:
        proc = subprocess.run(SQUEUE, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return Queue(error="`squeue` is not installed on this machine: Slurm cannot be asked")
    except subprocess.TimeoutExpired:
        return Queue(error="Slurm controller unreachable: `squeue` did not answer within 60 s")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else "no message"
        return Queue(
            error=f"Slurm controller unreachable: `squeue` failed (exit {proc.returncode}): {why}"
        )
    return Queue(dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line))


def read_object(path: Path) -> dict | None:
    """The JSON object in path; None when there is no such file; Unreadable when it is empty,
    cut short or not an object."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise Unreadable(path, f"cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        why = "empty file" if not text.strip() else f"not valid JSON (cut short?): {err}"
        raise Unreadable(path, why) from None
    if not isinstance(data, dict):
        raise Unreadable(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def read_launch(run_dir: Path) -> dict:
    return read_object(Path(run_dir) / LAUNCH) or {}


def last_submission(run_dir: Path) -> dict:
    subs = read_launch(run_dir).get("submissions", [])
    return subs[-1] if subs else {}


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """result.json's metrics, else the latest value of each metrics.csv column ({}: none)."""
    try:
        result = read_object(run_dir / RESULT)
    except Unreadable:
        result = None  # the row's state says so; the metrics come from metrics.csv instead
    if result is not None:
        return result
    path = run_dir / "metrics.csv"
    latest: dict[str, Any] = {}
    try:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):  # the latest non-empty value of each column
                latest.update({k: v for k, v in row.items() if k and _number(v) is not None})
    except (OSError, UnicodeDecodeError, csv.Error):
        pass  # no or broken metrics: the row shows "-"
    return latest


def _metric(metrics: dict[str, Any]) -> str:
    for name in METRIC_ORDER + tuple(k for k in metrics if "acc" in k):
        value = _number(metrics.get(name))
        if value is not None:
            return f"{name}={value:.4f}"
    return "-"


def _error(run_dir: Path, state: str, submission: dict) -> str:
    """The error the task recorded in error.txt (its last line); without one, where to look."""
    path = run_dir / ERROR
    if path.is_file():
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "failed (error.txt is empty)"
    ends = [e for e in read_events(run_dir) if e.get("event") in ("start", "preempted")]
    if ends and ends[-1]["event"] == "preempted":  # the task saw the signal that stopped it
        return f"stopped by {ends[-1].get('signal')} (preempted or cancelled); relaunch resumes it"
    if state in ENDED_BADLY:  # died before the task could record anything (killed, OOM, setup)
        logs = submission.get("stderr", [])
        return "no error.txt: the job ended before its task recorded an error" + (
            f"; see {logs[0]}" if logs else ""
        )
    return ""


def job_state(run_dir: Path, queue: dict[str, str]) -> tuple[str, str, str]:
    """(state, job id, detail) of the run in run_dir."""
    run_dir = Path(run_dir)
    try:
        sub, broken = last_submission(run_dir), None
    except Unreadable as err:
        sub, broken = {}, err
    job_id = str(sub.get("job_id", ""))
    try:
        if read_object(run_dir / RESULT) is not None:  # finished, whatever launch.json says
            return "FINISHED", job_id, ""
    except Unreadable as err:
        return UNREADABLE, job_id, str(err)
    if broken:
        return UNREADABLE, "", str(broken)
    if not sub:
        return "MISSING", "", ""
    if sub.get("executor") == "local":
        return ("RUNNING", job_id, "") if _pid_alive(job_id) else _ended(run_dir, "", sub)
    state = queue.get(job_id, "")
    if state in ACTIVE:
        starts = [e for e in read_events(run_dir) if e.get("event") == "start"]
        restarts = sum(1 for e in starts if e.get("rank", 0) == 0)
        return state, job_id, f"started {restarts}x" if restarts > 1 else ""
    error = getattr(queue, "error", "")
    if not state and error and not _failed_since(run_dir, sub):
        return UNKNOWN, job_id, error  # squeue did not answer: the job may well be running
    return _ended(run_dir, state, sub)


def _failed_since(run_dir: Path, submission: dict) -> bool:
    """Whether error.txt was written after the last submission: that job failed, whatever
    squeue would say (an older error.txt may be an earlier job's, its successor still running)."""
    try:
        submitted = time.mktime(time.strptime(submission.get("time", ""), "%Y-%m-%d %H:%M:%S"))
        return (run_dir / ERROR).stat().st_mtime > submitted
    except (OSError, ValueError):
        return False


def _ended(run_dir: Path, state: str, sub: dict) -> tuple[str, str, str]:
    job_id = str(sub.get("job_id", ""))
    error = _error(run_dir, state, sub)
    if error or state in ENDED_BADLY:
        return "FAILED", job_id, (f"{state}: " if state else "") + error
    return "LOST", job_id, "ended without result.json (killed?); relaunch resumes it"


def status_rows(entries: list[tuple[str, Path]], queue: dict | None = None) -> list[Row]:
    """One row per (key, run directory)."""
    queue = squeue_states() if queue is None else queue
    rows = []
    for key, run_dir in entries:
        state, job_id, detail = job_state(Path(run_dir), queue)
        metrics = _last_metrics(Path(run_dir))
        step = _number(metrics.get("step"))
        step_text = str(int(step)) if step is not None else "-"
        row = Row(key, state, job_id or "-", step_text, _metric(metrics), str(run_dir), detail)
        rows.append(row)
    return rows


def run_dirs_under(folder: Path) -> list[Path]:
    """Run directories at or below folder, not descending into one: a folder with config.yaml,
    or only the launcher's launch.json (submitted, not started). The report finds the same."""
    if (folder / "config.yaml").is_file() or (folder / LAUNCH).is_file():
        return [folder]
    skip = {"wandb", ".submitit", "checkpoints", "logs"}  # inside run directories
    children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in skip)
    return [d for child in children for d in run_dirs_under(child)]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header] + rows
    ]
    return "\n".join(lines)


def format_status(rows: list[Row]) -> str:
    header = ["job", "state", "job id", "step", "metric", "run directory"]
    table = format_table(
        header, [[r.key, r.state, r.job_id, r.step, r.metric, r.run_dir] for r in rows]
    )
    out = [table]
    notes = [
        f"  {r.key}: {r.detail}" for r in rows if r.detail and r.state not in (UNKNOWN, UNREADABLE)
    ]
    problems = [f"  {r.key}: {r.detail}" for r in rows if r.state == UNREADABLE]
    out += ["details:"] + notes if notes else []
    out += ["problems:"] + problems if problems else []
    unknown = [r for r in rows if r.state == UNKNOWN]
    for reason in dict.fromkeys(r.detail for r in unknown):  # one line, not one per job
        n = sum(r.detail == reason for r in unknown)
        out.append(f"state unknown for {n} job(s): {reason}; a relaunch resubmits none of them")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return "\n".join(out + [f"{len(rows)} jobs: {summary}"])
