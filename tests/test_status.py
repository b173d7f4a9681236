"""`sweeps/launch.py --status` and the relaunch plan when things are broken: run files cut short,
a Slurm controller that does not answer, a failed job's error, and how a task's end is recorded.

The unreachable controller is real: Slurm's own `squeue`, pointed by SLURM_CONF at a config whose
controller port has nothing listening (the test skips where Slurm's client is not installed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from submitit.core.utils import UncompletedJobError

from mach_lightning.launch import status, submit
from mach_lightning.launch.sweep import Job
from mach_lightning.launch.task import ERROR, log_event, read_events

from .conftest import REPO
from .test_launch import load_cli, write_sweep

LOCAL_PROFILE = str(REPO / "slurm" / "local.yaml")
HARMLESS = "`weights_only` was not set, defaulting to `False`."  # a stderr line of every job


def submitted(run_dir: Path, job_id: str) -> Path:
    """A run directory as the launcher leaves it for a Slurm job that started: launch.json, the
    job's stderr (ending in a harmless warning), a start event."""
    run_dir.mkdir(parents=True)
    stderr = run_dir / f"{job_id}_0_log.err"
    stderr.write_text(f"GPU available: False\n{HARMLESS}\n")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 60))
    sub = {"job_id": job_id, "executor": "slurm", "time": when, "stderr": [str(stderr)]}
    (run_dir / "launch.json").write_text(json.dumps({"key": run_dir.name, "submissions": [sub]}))
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "start", "rank": 0}) + "\n")
    return run_dir


@pytest.fixture
def dead_controller(tmp_path, monkeypatch) -> Path:
    """SLURM_CONF naming a controller on a local port where nothing listens."""
    if shutil.which("squeue") is None:
        pytest.skip("Slurm's client (squeue) is not installed")
    munge = subprocess.run(["munge", "-n"], capture_output=True) if shutil.which("munge") else None
    if munge is None or munge.returncode != 0:  # squeue would fail on authentication instead
        pytest.skip("munge does not answer (start it, e.g. with slurm/dev-cluster.sh start)")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        f"ClusterName=dead\nSlurmctldHost=localhost\nSlurmctldPort={port}\n"
        "AuthType=auth/munge\nMessageTimeout=2\n"
        "NodeName=n1 CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=n1 Default=YES\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return conf


def test_unreachable_controller_is_unknown_not_failed_and_is_not_resubmitted(
    dead_controller, tmp_path, capsys
):
    sweep = write_sweep(tmp_path, "seeds: [0]\n", name="one")  # one job: sync, seed 0
    runs = tmp_path / "runs"
    run_dir = submitted(runs / "one" / "seed-0", "4242")
    cli = load_cli()
    assert cli.main(["--status", str(sweep), f"run.root={runs}"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("seed-0"))
    assert row.split()[1:3] == ["UNKNOWN", "4242"], out
    assert "FAILED" not in out and HARMLESS not in out, out
    notes = [line for line in out.splitlines() if "controller unreachable" in line]
    assert len(notes) == 1 and "`squeue` failed" in notes[0], out  # one line, naming the command
    assert "Unable to contact slurm controller" in notes[0], out

    # Relaunching the sweep must not resubmit it: it may be running.
    argv = ["--sweep", str(sweep), "--cluster", LOCAL_PROFILE, f"run.root={runs}"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "skip: state unknown as 4242" in captured.out and " submit" not in captured.out
    assert "controller unreachable" in captured.err and "1 job(s) not resubmitted" in captured.err
    launch = json.loads((run_dir / "launch.json").read_text())
    assert len(launch["submissions"]) == 1  # nothing was submitted

    # What the run directory alone proves still shows: an error recorded after the submission.
    failed = submitted(tmp_path / "failed", "4243")
    (failed / ERROR).write_text("rank 0 (vm):\nTraceback ...\nValueError: boom\n")
    rows = status.status_rows([("running", run_dir), ("failed", failed)])
    assert [(r.state, r.detail) for r in rows][1] == ("FAILED", "ValueError: boom")
    assert rows[0].state == "UNKNOWN" and "controller unreachable" in rows[0].detail


def test_a_failed_jobs_error_is_read_from_error_txt_never_from_its_stderr(tmp_path):
    with_error = submitted(tmp_path / "with-error", "7_0")
    (with_error / ERROR).write_text("rank 0 (vm):\nTraceback ...\nValueError: boom\n")
    killed = submitted(tmp_path / "killed", "7_1")  # OOM-killed: no error.txt
    preempted = submitted(tmp_path / "preempted", "7_2")  # Slurm's SIGTERM, seen by the task
    log_event(preempted, "preempted", signal="SIGTERM")
    queue = {"7_0": "FAILED", "7_1": "OUT_OF_MEMORY", "7_2": "PREEMPTED"}
    entries = [("with-error", with_error), ("killed", killed), ("preempted", preempted)]
    rows = status.status_rows(entries, queue=queue)
    assert [r.state for r in rows] == ["FAILED", "FAILED", "FAILED"]
    assert rows[0].detail == "FAILED: ValueError: boom"
    assert HARMLESS not in rows[1].detail and "no error.txt" in rows[1].detail
    assert str(killed / "7_1_0_log.err") in rows[1].detail  # where to look instead
    assert rows[2].detail.startswith("PREEMPTED: stopped by SIGTERM")


def test_truncated_run_files_are_listed_as_problems_and_the_rest_still_shows(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "seeds: [0, 1, 2]\n", name="three")
    runs = tmp_path / "runs" / "three"
    done, cut, garbled = (submitted(runs / f"seed-{i}", f"9_{i}") for i in range(3))
    (done / "result.json").write_text(json.dumps({"test/acc": 0.97, "step": 40.0}))
    (cut / "result.json").write_text('{\n  "mem/peak_mb": 512.0,\n  "step": 4')  # disk full
    (garbled / "launch.json").write_text('{"key": "seed-2", "submissions": [{"job_id": "9_')
    assert load_cli().main(["--status", str(sweep), f"run.root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:4]}
    assert states == {"seed-0": "FINISHED", "seed-1": "UNREADABLE", "seed-2": "UNREADABLE"}, out
    problems = out.split("problems:\n", 1)[1]
    assert "seed-1: result.json: not valid JSON (cut short?)" in problems, out
    assert "seed-2: launch.json: not valid JSON (cut short?)" in problems, out
    assert "test/acc=0.9700" in out

    # The relaunch plan leaves them alone, saying why.
    jobs = [Job(d.name, "three", None, [], run_dir=d) for d in (done, cut, garbled)]
    actions = [action for _, action in submit.plan(jobs, queue={})]
    assert actions == ["skip: finished", "skip: unreadable", "skip: unreadable"]
    assert "seed-1: result.json: not valid JSON" in capsys.readouterr().err


def test_a_stop_after_a_requeue_event_is_no_error_but_a_real_failure_is(tmp_path):
    """What each rank records when its attempt ends: after rank 0's `requeue` event, a broken
    collective (the peer left) is part of the requeue; without one it is a failure; and a
    requeue submitit refuses (timed out too often) is a failure too."""
    from mach_lightning.launch.task import record_stop  # new with this behaviour

    run_dir = tmp_path / "run"
    since = time.time()
    log_event(run_dir, "start")
    gone = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1439")
    assert record_stop(run_dir, gone, since) is None
    assert (run_dir / ERROR).read_text().rstrip().endswith(str(gone))
    assert [e["event"] for e in read_events(run_dir)] == ["start", "error"]

    (run_dir / ERROR).unlink()
    since = time.time()
    log_event(run_dir, "start")
    log_event(run_dir, "requeue")  # rank 0's checkpoint(), before submitit requeues and exits
    assert record_stop(run_dir, gone, since) == "requeue"  # e.g. rank 1, whose peer has gone
    assert record_stop(run_dir, SystemExit(-1), since) == "requeue"  # rank 0: submitit's exit
    assert not (run_dir / ERROR).exists()
    assert [e["event"] for e in read_events(run_dir)][2:] == ["start", "requeue"]

    refused = UncompletedJobError("Job not requeued because: timed-out too many times.")
    assert record_stop(run_dir, refused, since) is None
    assert "timed-out too many times" in (run_dir / ERROR).read_text()
    assert read_events(run_dir)[-1]["event"] == "error"


def test_events_survive_a_line_cut_short(tmp_path):
    log_event(tmp_path, "start")
    with open(tmp_path / "events.jsonl", "a") as file:
        file.write('{"event": "end", "ti')  # the writer was killed mid-line
    assert [e["event"] for e in read_events(tmp_path)] == ["start"]
