"""Job states without Slurm accounting: the run directory first, then `squeue`.

Without slurmdbd, `sacct` (which submitit's own `job.state` uses) knows nothing and submitit says
UNKNOWN. So the truth here is, in order: `result.json` in the run directory (finished), the job id
recorded in `launch.json` as `squeue` shows it (queued, running, requeued; ended jobs stay visible
for the cluster's MinJobAge), a local job's process, and otherwise `error.txt` (failed, with the
error) or nothing (lost: the job ended without a result, e.g. killed).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
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
METRIC_ORDER = ("test/acc", "val/acc")


@dataclass
class Row:
    key: str
    state: str  # FINISHED | an squeue state (RUNNING, PENDING, ...) | FAILED | LOST | MISSING
    job_id: str
    step: str
    metric: str
    run_dir: str
    detail: str = ""  # the error of a failed job, restarts of a running one

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def squeue_states() -> dict[str, str]:
    """{job id (array tasks as 12_3): state} for every job squeue knows; {} without Slurm."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def read_launch(run_dir: Path) -> dict:
    path = Path(run_dir) / LAUNCH
    return json.loads(path.read_text()) if path.is_file() else {}


def last_submission(run_dir: Path) -> dict:
    subs = read_launch(run_dir).get("submissions", [])
    return subs[-1] if subs else {}


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text())
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    latest: dict[str, Any] = {}
    for row in rows:  # the latest non-empty value of each column
        latest.update({k: v for k, v in row.items() if v not in ("", None)})
    return latest


def _metric(metrics: dict[str, Any]) -> str:
    for name in METRIC_ORDER + tuple(k for k in metrics if "acc" in k):
        if name in metrics:
            return f"{name}={float(metrics[name]):.4f}"
    return "-"


def _error(run_dir: Path, submission: dict) -> str:
    path = run_dir / ERROR
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "failed"
    for err in submission.get("stderr", [])[:1]:  # died before the task could record anything
        if Path(err).is_file():
            lines = [ln for ln in Path(err).read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:200] if lines else ""
    return ""


def job_state(run_dir: Path, queue: dict[str, str]) -> tuple[str, str, str]:
    """(state, job id, detail) of the run in run_dir."""
    sub = last_submission(run_dir)
    job_id = str(sub.get("job_id", ""))
    if (run_dir / RESULT).is_file():
        return "FINISHED", job_id, ""
    if not sub:
        return "MISSING", "", ""
    if sub.get("executor") == "local" and _pid_alive(job_id):
        return "RUNNING", job_id, ""
    state = queue.get(job_id, "")
    if state in ACTIVE:
        restarts = sum(1 for e in read_events(run_dir) if e["event"] == "start" and e["rank"] == 0)
        return state, job_id, f"started {restarts}x" if restarts > 1 else ""
    error = _error(run_dir, sub)
    if error or state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
        return "FAILED", job_id, (f"{state}: " if state else "") + error
    return "LOST", job_id, "ended without result.json (killed?); relaunch resumes it"


def status_rows(entries: list[tuple[str, Path]], queue: dict | None = None) -> list[Row]:
    """One row per (key, run directory)."""
    queue = squeue_states() if queue is None else queue
    rows = []
    for key, run_dir in entries:
        state, job_id, detail = job_state(Path(run_dir), queue)
        metrics = _last_metrics(Path(run_dir))
        step = metrics.get("step", "-")
        step = str(int(float(step))) if step not in ("-", "") else "-"
        rows.append(Row(key, state, job_id or "-", step, _metric(metrics), str(run_dir), detail))
    return rows


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
    notes = [f"  {r.key}: {r.detail}" for r in rows if r.detail]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return "\n".join(
        [table] + (["details:"] + notes if notes else []) + [f"{len(rows)} jobs: {summary}"]
    )
