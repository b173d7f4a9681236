"""Exact resume after a SIGKILL at every kind of checkpoint: the resumed run's metrics.csv rows,
weights, best checkpoint and result.json equal those of the same run never interrupted."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mach_lightning.checkpoint_io import load_checkpoint
from tests.conftest import REPO, fit_cli

# Wall-clock and memory figures differ between any two runs; everything else must not. (A
# resumed queue holds the same tensors, but the autograd graphs of stashed forwards are rebuilt
# when used, so diag/inflight_mb reads other bytes for the first steps after a resume.)
UNTIMED = ("time/", "mem/", "diag/inflight_mb")


def _timed(key: str) -> bool:
    return key.startswith(UNTIMED)


def run_args(root: Path, run_id: str, *extra: str) -> list[str]:
    return [
        f"run.root={root}",
        f"run.id={run_id}",
        "seed=3",
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=3",
        "trainer.limit_val_batches=2",
        "trainer.progress_bar=false",
        "trainer.accelerator=cpu",
        "logger.wandb.enabled=false",
        "optim.scheduler=cosine",
        "model.num_components=3",
        *extra,
    ]


def killed_run(where: str, args: list[str]) -> subprocess.CompletedProcess:
    expected = 143 if where.startswith("term") else -signal.SIGKILL
    driver = str(REPO / "tests" / "kill_driver.py")
    proc = subprocess.run(
        [sys.executable, driver, where, "--", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == expected, proc.stderr[-3000:]
    return proc


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return [{k: v for k, v in r.items() if not _timed(k) and v != ""} for r in rows]


def untimed_result(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    return {k: v for k, v in result.items() if not _timed(k)}


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def assert_same_run(whole: Path, resumed: Path) -> None:
    rows_whole, rows_resumed = metric_rows(whole), metric_rows(resumed)
    assert len(rows_whole) == len(rows_resumed)
    for expected, got in zip(rows_whole, rows_resumed):
        assert got == expected
    assert untimed_result(resumed) == untimed_result(whole)
    a, b = final_state(whole), final_state(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    best = sorted(p.name for p in (whole / "checkpoints").glob("best-*.ckpt"))
    assert sorted(p.name for p in (resumed / "checkpoints").glob("best-*.ckpt")) == best


CASES = {
    # a periodic checkpoint in the middle of an epoch (with a training-meter window open)
    "mid-epoch": ("step:16", ("run.checkpoint_every_n_steps=4",)),
    # the periodic cadence lands on an epoch's last batch: the epoch-end save stands for it
    "epoch-last-batch": ("step:22", ("run.checkpoint_every_n_steps=11",)),
    # killed right after the epoch-end last.ckpt (best-checkpoint tracking of that epoch)
    "after-epoch-end": ("epoch_end:1", ()),
    # SIGTERM after LastCheckpoint's check at a batch: saved when Lightning raises, in on_exception
    "sigterm-late": ("term:16", ("run.checkpoint_every_n_steps=5",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("topology", ["sync", "delayed"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, case, topology):
    where, extra = CASES[case]
    flags = (f"topology.name={topology}", *extra)
    whole = fit_cli(*run_args(tmp_path, "whole", *flags))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_run(where, run_args(tmp_path, "cut", *flags))
    parent = tmp_path / "default"
    if where.startswith("term"):  # saved at the batch the signal stopped, not the periodic one
        ckpt = load_checkpoint(parent / "cut" / "checkpoints" / "last.ckpt")
        assert ckpt["topology_state"]["batch_step"] == int(where.split(":")[1])
    resumed = fit_cli(*run_args(tmp_path, "cut", *flags, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(parent / "whole", parent / "cut")
    events = [json.loads(x) for x in (parent / "cut" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "sigterm"] == ["resume"]


@pytest.mark.ddp
@pytest.mark.slow
def test_killed_ddp_delayed_run_resumes_exactly_with_each_ranks_queue(tmp_path):
    flags = (
        "topology.name=delayed",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "run.checkpoint_every_n_steps=4",
    )
    whole = fit_cli(*run_args(tmp_path, "whole", *flags))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_run("step:4", run_args(tmp_path, "cut", *flags))
    ckpt = load_checkpoint(tmp_path / "default" / "cut" / "checkpoints" / "last.ckpt")
    ranks = ckpt["topology_state_ranks"]
    assert len(ranks) == 2 and ranks[0]["batch_step"] == ranks[1]["batch_step"] == 4
    first_input = [next(iter(r["driver"]["stored"][0].values()))["inputs"][0] for r in ranks]
    assert not torch.equal(*first_input)  # each rank keeps its own batches' stored forwards
    resumed = fit_cli(*run_args(tmp_path, "cut", *flags, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "default" / "whole", tmp_path / "default" / "cut")
