"""Nothing lost: a failing command never damages a run, a finished run stays as it is, one
process at a time holds a run directory, files are whole or absent, and exit codes are honest."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Checkpoint

from mach_lightning.checkpoint_io import load_checkpoint
from tests.conftest import REPO, fit_cli, tiny_overrides


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory (but the lock) with the digest of its bytes."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return fit_cli(*tiny_overrides(tmp_path, "model.width=64", "model.embedding_dim=32", *extra))


@pytest.fixture(scope="module")
def finished_sync(tmp_path_factory):
    """One finished 2-epoch sync run, K=2 (copied per test: tests may try to damage it)."""
    root = tmp_path_factory.mktemp("finished")
    proc = cli(root, "run.id=done", "model.num_components=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def finished(finished_sync, tmp_path):
    import shutil

    shutil.copytree(finished_sync / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "default" / "done"


def assert_refused(proc, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]


def test_changed_structure_on_resume_is_refused_before_any_write(finished, tmp_path):
    before = snapshot(finished)
    proc = cli(
        tmp_path, "run.id=done", "resume=true", "model.num_components=3", "trainer.max_epochs=4"
    )
    assert_refused(proc, "model.num_components: 2 in the checkpoint, 3 now", "Nothing was written")
    assert snapshot(finished) == before


def test_changed_learning_rate_on_resume_is_refused_not_silently_ignored(finished, tmp_path):
    before = snapshot(finished)
    proc = cli(
        tmp_path,
        "run.id=done",
        "resume=true",
        "optim.lr=0.01",
        "model.num_components=2",
        "trainer.max_epochs=4",
    )
    assert_refused(proc, "optim.lr: 0.001 in the checkpoint, 0.01 now")
    assert snapshot(finished) == before


def test_another_topologys_checkpoint_is_refused_and_its_run_untouched(finished, tmp_path):
    before = snapshot(finished)
    ckpt = finished / "checkpoints" / "last.ckpt"
    proc = cli(tmp_path, f"ckpt_path={ckpt}", "topology.name=delayed", "model.num_components=4")
    assert_refused(proc, "topology.name: 'sync' in the checkpoint, 'delayed' now")
    assert snapshot(finished) == before


def test_garbage_checkpoint_is_refused_and_its_run_untouched(finished, tmp_path):
    bad = finished / "checkpoints" / "garbage.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    before = snapshot(finished)
    proc = cli(tmp_path, f"ckpt_path={bad}", "model.num_components=2")
    assert_refused(proc, "garbage.ckpt")
    assert snapshot(finished) == before


def test_resume_of_a_finished_run_changes_nothing_and_exits_0(finished, tmp_path):
    before = snapshot(finished)
    proc = cli(tmp_path, "run.id=done", "resume=true", "model.num_components=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has finished already" in proc.stdout
    assert snapshot(finished) == before


def test_raised_budget_trains_on_records_the_change_and_keeps_the_first_result(finished, tmp_path):
    first = json.loads((finished / "result.json").read_text())
    proc = cli(
        tmp_path, "run.id=done", "resume=true", "model.num_components=2", "trainer.max_epochs=3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((finished / "result.json").read_text())
    assert result["step"] == 33 and result["status"] == "finished"
    assert json.loads((finished / "result-step22.json").read_text()) == first
    events = [json.loads(x) for x in (finished / "events.jsonl").read_text().splitlines()]
    change = [e for e in events if e["event"] == "config_change"]
    assert [(e["key"], e["was"], e["now"]) for e in change] == [("trainer.max_epochs", 2, 3)]
    assert "max_epochs: 3" in (finished / "config.yaml").read_text()


def test_fixed_run_id_without_resume_never_trains_over_a_run(finished, tmp_path):
    before = snapshot(finished)
    proc = cli(tmp_path, "run.id=done", "model.num_components=2")
    assert_refused(proc, "already holds a run", "resume=true")
    assert snapshot(finished) == before


HOLD = """
import sys, time
from mach_lightning.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_directory_in_use_is_refused_naming_its_holder(tmp_path):
    run_dir = tmp_path / "runs" / "default" / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cli(tmp_path, "run.id=busy", "resume=true")
        assert_refused(proc, f"in use by process {holder.pid}")
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.csv").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel drops a killed holder's lock: the run can start now
    proc = cli(tmp_path, "run.id=busy", "resume=true", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sigterm_saves_last_ckpt_and_exits_143_without_a_result(tmp_path):
    args = tiny_overrides(tmp_path, "run.id=term", "trainer.max_epochs=50", "data.batch_size=16")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mach_lightning.fit", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "runs" / "default" / "term"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():  # training is under way
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "resume=true" in err
    assert not (run_dir / "result.json").exists()
    step = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["topology_state"]["batch_step"]
    assert 0 < step < 50 * 102  # saved where SIGTERM stopped it, long before the end
    with open(run_dir / "metrics.csv", newline="") as file:
        logged = [float(r["step"]) for r in csv.DictReader(file) if r.get("train/loss")]
    assert max(logged) == step - step % 2  # every row up to the checkpoint (log every 2 steps)


def test_limit_train_batches_0_is_refused_before_work(tmp_path):
    proc = cli(tmp_path, "trainer.limit_train_batches=0")
    assert_refused(proc, "trainer.limit_train_batches")
    assert not (tmp_path / "runs").exists()


def test_a_diverging_run_stops_flagged_diverged(tmp_path):
    proc = cli(tmp_path, "run.id=boom", "optim.lr=1e6", "trainer.max_epochs=5")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "runs" / "default" / "boom" / "result.json").read_text())
    assert result["status"] == "diverged"
    assert "trainer.divergence_factor" in result["reason"] or "nan" in result["reason"]
    assert result["step"] < 55  # stopped early, not after all 5 epochs
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "mach_lightning.report",
            str(tmp_path / "runs" / "default"),
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    problems = (tmp_path / "report" / "report.md").read_text().split("diverged", 1)
    assert len(problems) == 2 and "trainer.divergence_factor" in problems[1]


def test_overrides_may_come_before_config(tmp_path):
    proc = fit_cli(
        "seed=1",
        "--config",
        "configs/sync.yaml",
        *tiny_overrides(tmp_path),
        "trainer.max_epochs=1",
        "run.id=order",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (tmp_path / "runs" / "sync" / "order" / "config.yaml").read_text()
    assert "seed: 1" in config


class FillDiskAfterEpoch(Checkpoint):
    """After epoch 0's checkpoint, fill the run's disk but for a few KiB: the next save fails."""

    def __init__(self, root: Path):
        self.root = root

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            free = os.statvfs(self.root).f_bavail * os.statvfs(self.root).f_frsize
            (self.root / "filler").write_bytes(b"\0" * max(free - 8192, 0))


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MiB tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_keeps_the_last_good_checkpoint_and_says_so(tiny_disk, tiny_cfg, monkeypatch):
    from mach_lightning import training
    from mach_lightning.atomic import DiskFullError

    flags = (f"run.root={tiny_disk}", "run.id=full", "model.width=64", "model.embedding_dim=32")
    build = training.build_callbacks
    monkeypatch.setattr(
        training, "build_callbacks", lambda *a: build(*a) + [FillDiskAfterEpoch(tiny_disk)]
    )
    with pytest.raises(DiskFullError, match=r"disk full while writing .*\.ckpt"):
        training.run_fit(tiny_cfg(*flags, "trainer.max_epochs=3"))
    run_dir = tiny_disk / "default" / "full"
    kept = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert kept["topology_state"]["batch_step"] == 11  # epoch 0's checkpoint, whole
    assert not list(run_dir.rglob(".*.tmp-*"))  # no half-written temporary file is left
    (tiny_disk / "filler").unlink()
    monkeypatch.setattr(training, "build_callbacks", build)
    resumed = training.run_fit(tiny_cfg(*flags, "trainer.max_epochs=3", "resume=true"))
    assert resumed["metrics"]["step"] == 33
